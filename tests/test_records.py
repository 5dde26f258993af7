"""The typed records at the seams keep the files they are written to byte for byte: a file
of the form written before the records (checkpoint metadata, eval.json, tasks.json) reads
back into its record and is written again with the same bytes."""

from __future__ import annotations

import json

from gopher_jax.checkpoint.meta import CheckpointMeta
from gopher_jax.evaluate import EvalResults
from gopher_jax.tasks import run as tasks_run
from gopher_jax.tasks.records import TaskResults, TaskScore
from gopher_jax.tasks.spec import Example, Task

# <step>/meta/metadata as the checkpoint manager wrote it (keys in the file's order).
META = {"step": 20, "saved_at": 1764700000.25, "data": {"tokenizer": "ab12", "train": "cd34"},
        "data_step": 22, "spikes": {"skips": [[3, 5]], "recent": [2.5, 2.4]},
        "goodput": {"step": 1.5, "wall": 3.0}, "config": {"seed": 0, "model": {"d_model": 64}},
        "layout": "scanned", "mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "rules": "fsdp",
        "process_count": 2, "device_count": 8}
IMPORTED = {**META, "step": 0, "data_step": 0,
            "hf_import": {"from": "/tmp/hf", "step": 300, "eval": None}}

# eval.json of one corpus and of a mixture (NaN: an empty split).
EVAL = {"step": 40, "int8": False, "warnings": ["split test has 3 chunks"],
        "splits": {"validation": {"loss": 3.5, "bits_per_byte": 2.1470, "tokens": 1200.0,
                                  "bytes": 5000.0, "unigram_bits_per_byte": 4.25},
                   "test": {"loss": float("nan"), "bits_per_byte": float("nan"),
                            "tokens": 0.0, "bytes": 0.0, "unigram_bits_per_byte": 4.0}}}
MIXTURE_EVAL = {"step": 40, "int8": True, "warnings": [],
                "splits": {"validation": {"loss": 3.5, "bits_per_byte": 2.0, "tokens": 10.0,
                                          "bytes": 40.0, "unigram_bits_per_byte": 4.0,
                                          "shares": {"a": 0.25, "b": 0.75}}},
                "sources": {"a": {"validation": {"loss": 3.0, "bits_per_byte": 1.5,
                                                 "tokens": 4.0, "bytes": 16.0, "chunks": 2.0,
                                                 "unigram_bits_per_byte": 3.5}}}}

# tasks.json: a multiple-choice task and a corpus (with its counts).
TASKS = {"step": 7, "tasks": {
    "pick": {"group": "toy", "kind": "multiple_choice", "n": 2, "chance": 0.5,
             "main_metric": "acc", "metrics": {"acc": 0.5, "acc_norm": 1.0}},
    "prose": {"group": "language_modelling", "kind": "language_modelling", "n": 3,
              "chance": 0.0, "main_metric": "bits_per_byte", "metrics": {"bits_per_byte": 2.5},
              "counts": {"documents": 3, "bytes": 90, "text_bytes": 90, "tokens": 30,
                         "loss": 5.2}}},
    "groups": {"toy": {"mean": 0.5, "tasks": 1},
               "language_modelling": {"mean": 2.5, "tasks": 1}}}


def _same_bytes(record_type, d):
    record = record_type.from_json(json.loads(json.dumps(d)))
    assert json.dumps(record.to_json(), indent=2) == json.dumps(d, indent=2)
    return record


def test_checkpoint_meta_keeps_the_file():
    m = _same_bytes(CheckpointMeta, META)
    assert (m.step, m.data_step, m.mesh["fsdp"], m.hf_import) == (20, 22, 4, None)
    assert _same_bytes(CheckpointMeta, IMPORTED).hf_import["step"] == 300
    # an older file without the spike, goodput and position keys still reads
    old = {k: v for k, v in META.items() if k not in ("spikes", "goodput", "data_step")}
    m = CheckpointMeta.from_json(old)
    assert (m.spikes, m.goodput, m.data_step) == ({}, {}, 20)


def test_eval_results_keep_the_file():
    r = _same_bytes(EvalResults, EVAL)
    assert r.splits["validation"].bits_per_byte == 2.1470 and r.sources is None
    r = _same_bytes(EvalResults, MIXTURE_EVAL)
    assert r.splits["validation"].shares == {"a": 0.25, "b": 0.75}
    assert r.sources["a"]["validation"].chunks == 2.0


def test_task_results_keep_the_file_and_summarize_into_it():
    r = _same_bytes(TaskResults, TASKS)
    assert r.tasks["pick"].main == 0.5 and r.tasks["pick"].counts is None
    # summarize builds the same results from the scores
    pick = Task(name="pick", group="toy", kind="multiple_choice", chance=0.5,
                examples=(Example(context="a", choices=(" b", " c"), answer=0),) * 2)
    prose = Task(name="prose", group="language_modelling", kind="language_modelling",
                 examples=(), chance=0.0, source="split:validation")
    scored = [TaskScore(metrics={"acc": 0.5, "acc_norm": 1.0}, predictions=[{}, {}]),
              TaskScore(metrics={"bits_per_byte": 2.5}, n=3,
                        counts=TASKS["tasks"]["prose"]["counts"])]
    assert tasks_run.summarize([pick, prose], scored, 7).to_json() == TASKS
    assert "| pick | toy | multiple_choice | 2 | acc 0.500, acc_norm 1.000 | 0.500 |" in \
        tasks_run.markdown(r)
