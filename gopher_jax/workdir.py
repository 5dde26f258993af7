"""The names of what a workdir holds, in one place (local or gs://; storage.path joins them).

    config.json      the config a run trained with (train)
    checkpoints/     Orbax checkpoints, one folder per step (checkpoint/)
    metrics.jsonl    one JSON row per logged step; tb/ the same as TensorBoard events
    eval.json        `eval`'s bits per byte (eval_int8.json: `eval --int8`'s)
    tasks.json, tasks.md     `tasks`'s results (tasks_int8.json, tasks_int8.md: `tasks --int8`'s)
    ladder.json      the ladder config a `scaling run` workdir trains (scaling/)
    results.json, results.md, fit.json, unigram.json   a ladder's results and fits
"""

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
TENSORBOARD = "tb"
EVAL_JSON = "eval.json"
TASKS_JSON = "tasks.json"
TASKS_MD = "tasks.md"
LADDER_JSON = "ladder.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIT_JSON = "fit.json"
UNIGRAM_JSON = "unigram.json"


def int8_name(name: str, int8: bool = True) -> str:
    """A result file's name for a measurement with int8 weights: eval.json -> eval_int8.json
    (`name` unchanged when not int8), so the float results are kept beside them."""
    if not int8:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}_int8{dot}{ext}"
