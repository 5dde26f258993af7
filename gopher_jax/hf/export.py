"""`export hf`: a checkpoint step as a Hugging Face model directory.

    DIR/config.json                 model_type "gopher", auto_map to the two files below, the
                                    gopher_jax config it was trained with and its step
    DIR/configuration_gopher.py     GopherConfig       (gopher_jax/hf/remote/, copied)
    DIR/modeling_gopher.py          GopherForCausalLM  (PyTorch)
    DIR/tokenization_gopher.py      GopherTokenizer    (wraps the SentencePiece model)
    DIR/tokenizer.model             our SentencePiece model, as trained
    DIR/tokenizer_config.json, special_tokens_map.json, generation_config.json
    DIR/model.safetensors           or model-0000k-of-0000n.safetensors + the index
    DIR/README.md                   the model, its training config and step, its eval numbers

Tensors go from the checkpoint to the file one stored array at a time
(checkpoint_reader.StepReader; a scanned array by runs of its chunks' layers): no host holds
the model. The directory is written under a temporary name and renamed when
complete. Every file is a pure function of the checkpoint's values and metadata (no
timestamps, no paths of this machine), so the same weights always give the same bytes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ml_collections
import ml_dtypes
import numpy as np

from gopher_jax import config as config_lib
from gopher_jax import workdir as workdir_lib
from gopher_jax.hf import safetensors_out, weights
from gopher_jax.hf.checkpoint_reader import StepReader
from gopher_jax.model import sizes

if TYPE_CHECKING:
    from gopher_jax.checkpoint import CheckpointMeta

REMOTE_DIR = pathlib.Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_gopher.py", "modeling_gopher.py", "tokenization_gopher.py")
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Config keys that name places on the machine that trained: not part of the model.
LOCAL_KEYS = (("data", "data_dir"), ("data", "tokenizer_path"))
ARCHITECTURE = "GopherForCausalLM"
MODEL_TYPE = "gopher"


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run config without LOCAL_KEYS."""
    out = json.loads(json.dumps(config))
    for section, key in LOCAL_KEYS:
        out.get(section, {}).pop(key, None)
    return out


def provenance(meta: CheckpointMeta, eval_results: dict[str, Any] | None
               ) -> dict[str, Any]:
    """{"config", "step", "eval"} of the weights at a checkpoint: the training steps behind
    them (an imported checkpoint adds its own steps to those of the model it was imported
    from) and the eval numbers measured at that step, if any."""
    source = meta.hf_import or {}
    step = int(source.get("step", 0)) + int(meta.step)
    if eval_results is None and meta.step == 0:
        eval_results = source.get("eval")
    return {"config": portable_config(meta.config), "step": step, "eval": eval_results}


def eval_at(workdir: str | os.PathLike, step: int) -> dict[str, Any] | None:
    """<workdir>/eval.json's bits per byte per split when it measured `step`, else None."""
    from gopher_jax import storage

    path = storage.path(workdir) / workdir_lib.EVAL_JSON
    if not path.is_file():
        return None
    results = storage.read_json(path)
    if results.get("step") != step:
        return None
    return {split: {k: r[k] for k in ("bits_per_byte", "loss", "unigram_bits_per_byte")
                    if k in r}
            for split, r in results.get("splits", {}).items()}


def hf_config(m: ml_collections.ConfigDict, seq_len: int, dtype: str,
              source: dict[str, Any]) -> dict[str, Any]:
    from gopher_jax.data.tokenizer import EOS_ID, PAD_ID

    return {
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": "configuration_gopher.GopherConfig",
                     "AutoModelForCausalLM": f"modeling_gopher.{ARCHITECTURE}"},
        "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "head_dim": m.head_dim,
        "intermediate_size": config_lib.d_ff(m),
        "rms_norm_eps": m.norm_eps,
        "rel_pos_max_wavelength": m.rel_pos_max_wavelength,
        "max_position_embeddings": seq_len,
        "tie_word_embeddings": m.tie_embeddings,
        # Documents start with EOS in training: it is also the start token.
        "bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
        "dtype": dtype,
        "use_cache": True,
        "gopher_jax": source,
    }


def tokenizer_files() -> dict[str, Any]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json."""
    from gopher_jax.data.tokenizer import EOS_ID, PAD_ID

    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "bos_token": "</s>"}
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "GopherTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_gopher.GopherTokenizer", None]},
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            **special},
        "special_tokens_map.json": special,
        "generation_config.json": {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
                                   "pad_token_id": PAD_ID},
    }


def readme(m: ml_collections.ConfigDict, source: dict[str, Any], dtype: str,
           files: list[str]) -> str:
    counts = sizes.param_counts(m)
    c = source["config"]
    lines = [
        f"# {c.get('name', 'gopher')} (gopher_jax)",
        "",
        "A Gopher-family decoder (Rae et al. 2021) trained with gopher_jax and exported with "
        "`python -m gopher_jax export hf`: pre-RMSNorm blocks, Transformer-XL relative "
        "attention with per-layer u/v biases, a 4x GELU (tanh) MLP, "
        + ("tied" if m.tie_embeddings else "untied") + " embeddings.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)",
        "ids = tok('To be, or not to be', return_tensors='pt').input_ids  # [EOS] + text",
        "print(tok.decode(model.generate(ids, max_new_tokens=32, do_sample=False)[0]))",
        "```",
        "",
        "The tokenizer prepends EOS (documents start with it in training) unless "
        "`add_special_tokens=False`.",
        "",
        "## Model",
        "",
        f"- parameters: {counts['total']:,} ({counts['non_embedding']:,} outside the "
        "embedding)",
        f"- layers {m.num_layers}, d_model {m.d_model}, heads {m.num_heads} x {m.head_dim}, "
        f"feed-forward {config_lib.d_ff(m)}, vocabulary {m.vocab_size}",
        f"- trained context {c['data']['seq_len']} tokens (positions are relative: longer "
        "inputs run)",
        f"- weights: {dtype}, " + ", ".join(files),
        "",
        "## Training",
        "",
        f"- steps: {source['step']}",
        f"- dataset: {c['data'].get('dataset')}; batch {c['train']['batch_size']} x "
        f"{c['data']['seq_len']} tokens; {c['train']['optimizer']} at peak learning rate "
        f"{c['train']['learning_rate']}",
        "- the full gopher_jax config is under `gopher_jax.config` in config.json",
        "",
        "## Evaluation",
        "",
    ]
    if source.get("eval"):
        lines += ["| split | bits per byte | unigram bits per byte |", "| --- | --- | --- |"]
        for split, r in sorted(source["eval"].items()):
            uni = r.get("unigram_bits_per_byte")
            lines.append(f"| {split} | {r['bits_per_byte']:.4f} | "
                         + (f"{uni:.4f}" if uni is not None else "-") + " |")
    else:
        lines.append(f"No evaluation at step {source['step']} (run `python -m gopher_jax eval "
                     "--workdir ...` before exporting).")
    return "\n".join(lines) + "\n"


def check(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None,
          max_shard_mb: int, tokenizer_path: str | os.PathLike | None
          ) -> tuple[int, pathlib.Path]:
    """The export's mistakes, refused (UserError) before anything is written: no checkpoint
    (or not that step), an --out that is a file or a non-empty directory, a shard size below
    1 MiB, no tokenizer. Returns (the step, the tokenizer file)."""
    from gopher_jax import checkpoint as ckpt_lib
    from gopher_jax import storage
    from gopher_jax.errors import UsageError, UserError
    from gopher_jax.hf.checkpoint_reader import checkpoint_steps

    if max_shard_mb < 1:
        raise UsageError(f"--max_shard_mb={max_shard_mb} must be >= 1", "pass e.g. 2048")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ckpt_lib.CheckpointError(
            f"no checkpoints in {workdir}", "train first with `python -m gopher_jax train "
            f"--config ... --workdir {workdir}`, or pass the --workdir of a trained run")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UsageError(f"--step {step} is not a checkpoint of {workdir} (it has "
                         f"{', '.join(map(str, steps))})", "pass one of those or no --step")
    if storage.is_remote(out):
        raise UsageError(f"--out {out} is not a local path",
                         "export to a local directory, then copy it (e.g. gsutil -m cp -r)")
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory",
                        "pass a new directory")
    if tokenizer_path is None:
        meta = ckpt_lib.read_meta(storage.path(workdir) / workdir_lib.CHECKPOINTS, step)
        return step, run_tokenizer(config_lib.from_json(json.dumps(meta.config)))
    tokenizer_path = pathlib.Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise UserError(f"--tokenizer {tokenizer_path} is not a file",
                        "pass the run's SentencePiece model")
    return step, tokenizer_path


def run_tokenizer(c: ml_collections.ConfigDict) -> pathlib.Path:
    """The file of the run config's tokenizer (refused when it is missing or too large)."""
    from gopher_jax.data import pipeline
    from gopher_jax.errors import DataError, UserError

    try:
        return pathlib.Path(pipeline.load_tokenizer(c).path)
    except DataError as e:
        raise UserError(f"the run's tokenizer cannot be used: {e}",
                        "pass --tokenizer FILE, the run's SentencePiece model") from None


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int,
           dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           tokenizer_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Writes checkpoint `step` of `workdir` to the new directory `out` (see the module
    docstring); returns {"dir", "step", "files", "tensors", "bytes"}. `tokenizer_path`
    defaults to the run config's tokenizer."""
    reader = StepReader(workdir, step)
    c = config_lib.from_json(json.dumps(reader.meta.config))
    m = c.model
    tokenizer_path = pathlib.Path(tokenizer_path or run_tokenizer(c))
    source = provenance(reader.meta, eval_at(workdir, step))
    np_dtype = DTYPES[dtype]
    entries = weights.entries(m)

    out = pathlib.Path(out)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        files = safetensors_out.write(tmp, [(e.hf_name, e.hf_shape) for e in entries],
                                      hf_tensors(reader, entries), np_dtype, max_shard_bytes)
        names = [f.name for f in files]
        _write_json(tmp / "config.json", hf_config(m, c.data.seq_len, dtype, source))
        for name, content in tokenizer_files().items():
            _write_json(tmp / name, content)
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        (tmp / "README.md").write_text(readme(m, source, dtype, names))
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"dir": str(out), "step": source["step"], "files": names, "tensors": len(entries),
            "bytes": sum((out / n).stat().st_size for n in names)}


def hf_tensors(reader: StepReader, entries: list[weights.Entry]
               ) -> Iterator[tuple[int, np.ndarray]]:
    """(index into entries, HF tensor) for every entry, each stored array read once: a
    stacked (scanned) array is read whole, by runs of layers as it is chunked, and its
    layers' tensors are given before the next array is read."""
    by_source: dict[tuple[str, ...], list[int]] = {}
    for i, e in enumerate(entries):
        by_source.setdefault(e.source, []).append(i)
    for source, idx in by_source.items():
        if entries[idx[0]].layer is None:
            yield idx[0], entries[idx[0]].to_hf(reader.read(source))
            continue
        by_layer = {entries[i].layer: i for i in idx}
        for start, block in reader.layer_blocks(source):
            for j in range(block.shape[0]):
                i = by_layer[start + j]
                yield i, entries[i].to_hf(block[j])
            del block


def _write_json(path: pathlib.Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
