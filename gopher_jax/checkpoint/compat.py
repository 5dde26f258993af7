"""The resume policy: which config keys a resume must not change (they change the shapes,
dtypes or structure of the state, or the data order), the diff of a checkpoint's config
against the current one, and the refusal that names the keys that differ."""

from __future__ import annotations

import json

import ml_collections

from gopher_jax import config as config_lib
from gopher_jax.checkpoint.errors import CheckpointError
from gopher_jax.checkpoint.meta import CheckpointMeta

# Config keys that change the shapes, dtypes or structure of the state.
MODEL_KEYS = (
    "model.vocab_size", "model.num_layers", "model.num_heads", "model.head_dim",
    "model.d_model", "model.mlp_ratio", "model.tie_embeddings", "model.param_dtype",
    "model.scan_layers", "train.optimizer", "train.master_fp32",
)
# What decides the token ids: the tokenizer is trained on the dataset (or on the mixture:
# "data.sources" covers every key under it).
TOKENIZER_KEYS = ("data.dataset", "data.text_files", "data.nfkc", "data.tokenizer_path",
                  "data.sources")
# A training resume must change none of these (what decides which chunks step s reads is
# part of it: changing that breaks the exact resume).
SHAPE_KEYS = MODEL_KEYS + TOKENIZER_KEYS + (
    "seed", "train.batch_size", "data.seq_len", "data.train_split")
# Evaluation and sampling need only the same model and tokenizer: any context length,
# batch size or seed will do (relative positions carry past the training length).
EVAL_KEYS = MODEL_KEYS + TOKENIZER_KEYS


class ConfigMismatchError(CheckpointError):
    """The workdir holds a checkpoint of a different model."""


def config_diff(saved: dict, current: dict, keys: tuple[str, ...] = SHAPE_KEYS
                ) -> tuple[list[str], list[str]]:
    """(differing keys among `keys`, other keys that differ)."""
    a, b = config_lib.flatten(saved), config_lib.flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shape = [k for k in changed if _covered(k, keys)]
    return shape, [k for k in changed if not _covered(k, keys)]


def _covered(key: str, keys: tuple[str, ...]) -> bool:
    return key in keys or any(key.startswith(k + ".") for k in keys)


def check_config(meta: CheckpointMeta, c: ml_collections.ConfigDict,
                 keys: tuple[str, ...] = SHAPE_KEYS) -> list[str]:
    """Raises ConfigMismatchError naming the keys among `keys` (by default what a training
    resume must keep) that differ from the checkpoint's config; returns the other (allowed)
    differing keys."""
    saved = meta.config
    shape, other = config_diff(saved, json.loads(c.to_json()), keys)
    if shape:
        a, b = config_lib.flatten(saved), config_lib.flatten(json.loads(c.to_json()))
        diffs = ", ".join(f"{k}: {a.get(k)!r} in the checkpoint vs {b.get(k)!r} now"
                          for k in shape)
        raise ConfigMismatchError(
            f"the checkpoint at step {meta.step} was trained with another model or data "
            f"order ({diffs})",
            "use another --workdir, or the checkpoint's config (config.json in the workdir)")
    return other


class DataChangedError(CheckpointError):
    """The data a checkpoint was trained on differs from what the config now prepares."""


def check_data(meta: CheckpointMeta, current: dict[str, str], accept: bool = False
               ) -> list[str]:
    """Compares the checkpoint's data fingerprints (tokenizer, training chunks) with the
    current ones. A difference raises DataChangedError naming it, unless `accept`; returns
    the names of what changed. A checkpoint without fingerprints is not checked."""
    saved = meta.data
    if not saved:
        return []
    changed = [k for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]
    if changed and not accept:
        what = ", ".join(f"{k} {saved.get(k)} -> {current.get(k)}" for k in changed)
        raise DataChangedError(
            f"the training data changed since the checkpoint at step {meta.step} "
            f"({what})", "train in a new --workdir, or pass --accept_new_data to continue "
            "this run on the new data (recorded in its metrics)")
    return changed
