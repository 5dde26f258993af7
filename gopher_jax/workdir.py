"""The names of what a workdir holds, in one place (local or gs://; storage.path joins them).

    config.json      the config a run trained with (train)
    checkpoints/     Orbax checkpoints, one folder per step (checkpoint/)
    metrics.jsonl    one JSON row per logged step; tb/ the same as TensorBoard events
    eval.json        `eval`'s bits per byte
    tasks.json, tasks.md     `tasks`'s results
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
