"""`python -m gopher_jax COMMAND --config experiments/X.py [--config.a.b=v ...] [--workdir DIR]`.

Commands: train, eval, sample, params, data, tokenizer, checkpoint, aot, scaling.
Thin: parses flags, then calls the module that does the work.
"""

from __future__ import annotations

import json
import pathlib
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

COMMANDS = {
    "params": "print parameter counts and training FLOPs per token (no allocation)",
    "train": "train (resumes from the newest checkpoint in --workdir)",
    "eval": "bits per byte on validation and test (config: --config, else the workdir's)",
    "sample": "generate text from a trained workdir (config as for eval)",
    "data": "data prepare: build the dataset, tokenizer and token chunks",
    "tokenizer": "tokenizer train: train the SentencePiece model",
    "aot": "compile the train step for a TPU topology here (needs .[tpu]): memory, FLOPs",
    "checkpoint": "checkpoint info: list a workdir's checkpoints (steps, sizes, layout, mesh)",
    "scaling": "scaling run | fit: train a ladder of sizes (--member i for one), fit the law",
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "experiments/default.py", "experiment config file")
flags.DEFINE_string("workdir", "runs/default", "run directory (checkpoints, metrics)")
flags.DEFINE_string("prompt", "", "sample: the text to continue")
flags.DEFINE_integer("max_new_tokens", 200, "sample: tokens to generate")
flags.DEFINE_float("temperature", 0.8, "sample: softmax temperature (0 = greedy)")
flags.DEFINE_integer("top_k", 40, "sample: keep the k most likely tokens (0 = all)")
flags.DEFINE_integer("sample_seed", 0, "sample: random seed")
flags.DEFINE_string("topology", "v5p:2x2x1", "aot: TPU generation and chip grid, e.g. v3:32x32")
flags.DEFINE_integer("num_slices", 1, "aot: slices of --topology (data parallel across them)")
flags.DEFINE_string("aot_json", "", "aot: also write the report as JSON here")
flags.DEFINE_string("coordinator", "", "multi-process: host:port of process 0")
flags.DEFINE_integer("num_processes", 0, "multi-process: number of processes")
flags.DEFINE_integer("process_id", -1, "multi-process: this process's index")
flags.DEFINE_string("member", "", "scaling run: only this member (index, smallest first, or name)")


def usage() -> str:
    lines = [__doc__ or "", "commands:"]
    lines += [f"  {k:<10} {v}" for k, v in COMMANDS.items()]
    return "\n".join(lines)


def trained_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config a workdir was trained with (written by `train`), if any."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        return None
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    cmd, rest = argv[1], argv[2:]
    sub = rest[0] if rest and not rest[0].startswith("-") else None
    if sub is not None:
        rest = rest[1:]
    FLAGS([argv[0], *rest])
    c = FLAGS.config
    if cmd in ("eval", "sample") and not FLAGS["config"].present:
        c = trained_config(FLAGS.workdir) or c
    if FLAGS.coordinator:  # read by parallel.distributed.initialize_from_env
        import os
        os.environ.update(GOPHER_COORDINATOR=FLAGS.coordinator,
                          GOPHER_NUM_PROCESSES=str(FLAGS.num_processes),
                          GOPHER_PROCESS_ID=str(FLAGS.process_id))
    if cmd == "params":
        from gopher_jax import report
        print(report.params_report(c))
    elif cmd == "aot":
        from gopher_jax import aot
        return aot.main(c, FLAGS.topology, FLAGS.num_slices, FLAGS.aot_json)
    elif cmd == "train":
        from gopher_jax.train import loop
        loop.train(c, FLAGS.workdir)
    elif cmd == "eval":
        from gopher_jax import evaluate
        evaluate.main(c, FLAGS.workdir)
    elif cmd == "sample":
        from gopher_jax import sample
        print(sample.main(c, FLAGS.workdir, FLAGS.prompt, FLAGS.max_new_tokens,
                          FLAGS.temperature, FLAGS.top_k, FLAGS.sample_seed))
    elif cmd == "data":
        if sub != "prepare":
            print("usage: python -m gopher_jax data prepare --config ...", file=sys.stderr)
            return 2
        from gopher_jax.data import pipeline
        pipeline.main_prepare(c)
    elif cmd == "tokenizer":
        if sub != "train":
            print("usage: python -m gopher_jax tokenizer train --config ...", file=sys.stderr)
            return 2
        from gopher_jax.data import tokenizer
        tokenizer.main_train(c)
    elif cmd == "checkpoint":
        if sub != "info":
            print("usage: python -m gopher_jax checkpoint info --workdir DIR", file=sys.stderr)
            return 2
        from gopher_jax import checkpoint
        checkpoint.main_info(FLAGS.workdir)
    elif cmd == "scaling":
        from gopher_jax import scaling
        if sub == "run":
            out = scaling.run(c, FLAGS.workdir, FLAGS.member or None)
            return 1 if out["failed"] else 0
        if sub == "fit":
            scaling.fit(FLAGS.workdir)
            return 0
        print("usage: python -m gopher_jax scaling run|fit --config experiments/scaling_ladder.py "
              "--workdir DIR [--member i]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
