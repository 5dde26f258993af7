"""Downstream tasks: a declarative JSON format (spec), a task's prompts and metrics (grading)
from log-likelihood and greedy-decoding queries to a model (model_queries) compared with the
targets (text_match), built-in and file-based suites (iambic, suites), language-modelling
corpora as tasks (corpora), and the runner that scores a trained workdir (run)."""
