"""`import hf`: a Gopher model directory (as `export hf` writes it) as a new workdir whose step 0
checkpoint holds its weights, for `eval`, `sample`, `tasks` and fine-tuning with `train`.

The workdir gets:
    checkpoints/0/        the train state: the imported params, a fresh optimiser state
    config.json           the run config the model was exported with (data.tokenizer_path
                          pointing at the copy below), as `train` writes it
    tokenizer.model       the directory's SentencePiece model
    experiment.py         a config file that loads config.json, for `train --config`
                          (fine-tuning: `--config.train.steps=...` and any other schedule)

Each device's part of each parameter is read on its own from the memory-mapped safetensors
files (only the rows and columns it holds), so no host holds the model, whatever its size.
The workdir may be on Cloud Storage.

The checkpoint's metadata records the training steps and eval numbers behind the weights,
so that exporting it again writes the same directory, byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import struct
from typing import Any

import jax
import ml_collections
import numpy as np

from gopher_jax import config as config_lib
from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.errors import UserError
from gopher_jax.hf import export as export_lib
from gopher_jax.hf import safetensors_out, weights
from gopher_jax.hf.checkpoint_reader import checkpoint_steps
from gopher_jax.model import sizes

EXPERIMENT_PY = '''"""The config of a model imported from Hugging Face: config.json beside it."""

import pathlib

from gopher_jax import config


def get_config():
    return config.from_json((pathlib.Path(__file__).parent / "config.json").read_text())
'''
# HF config field -> our model config key (the gopher_jax config, when present, has them all)
MODEL_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model",
                "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "head_dim": "head_dim", "rms_norm_eps": "norm_eps",
                "rel_pos_max_wavelength": "rel_pos_max_wavelength",
                "tie_word_embeddings": "tie_embeddings"}


def read_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The directory's config.json, refused (UserError) unless it is a Gopher model with
    weights and a tokenizer."""
    hf_dir = pathlib.Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"--from {hf_dir} has no config.json (not a Hugging Face model "
                        "directory)", "pass a directory written by `python -m gopher_jax "
                        "export hf`")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e})", "pass an intact model directory") from None
    kind = hf.get("model_type")
    if kind != export_lib.MODEL_TYPE:
        arch = ", ".join(hf.get("architectures") or []) or "unknown architecture"
        raise UserError(f"--from {hf_dir} holds a {kind!r} model ({arch}), not a Gopher "
                        "model", "pass a directory written by `python -m gopher_jax export hf`")
    try:
        where = safetensors_out.weight_files(hf_dir)
    except (ValueError, KeyError, struct.error) as e:
        raise UserError(f"--from {hf_dir}: its safetensors index or header cannot be read "
                        f"({type(e).__name__}: {e})", "pass an intact model directory (export "
                        "it again)") from None
    if not where:
        raise UserError(f"--from {hf_dir} has no safetensors weights",
                        "export the model again with `python -m gopher_jax export hf`")
    if not (hf_dir / export_lib.TOKENIZER_FILE).is_file():
        raise UserError(f"--from {hf_dir} has no {export_lib.TOKENIZER_FILE}",
                        "export the model again with `python -m gopher_jax export hf`")
    return hf


def run_config(hf: dict[str, Any], tokenizer_path: str | os.PathLike
               ) -> ml_collections.ConfigDict:
    """The run config of the model: the exported gopher_jax config (over today's defaults),
    or the defaults with the HF shape fields; data.tokenizer_path = `tokenizer_path`."""
    source = (hf.get("gopher_jax") or {}).get("config")
    c = config_lib.from_json(json.dumps(source or {}))
    if source is None:
        for field, key in MODEL_FIELDS.items():
            if field in hf:
                c.model[key] = hf[field]
        c.data.seq_len = int(hf.get("max_position_embeddings", c.data.seq_len))
    mismatch = [f"{field} {hf[field]!r} vs model.{key} {c.model[key]!r}"
                for field, key in MODEL_FIELDS.items() if field in hf and hf[field] != c.model[key]]
    if hf.get("intermediate_size", config_lib.d_ff(c.model)) != config_lib.d_ff(c.model):
        mismatch.append(f"intermediate_size {hf['intermediate_size']} is not "
                        f"{c.model.mlp_ratio} x hidden_size")
    if mismatch:
        raise UserError(f"config.json disagrees with its gopher_jax config: {'; '.join(mismatch)}",
                        "export the model again with `python -m gopher_jax export hf`")
    c.data.tokenizer_path = (str(tokenizer_path) if storage.is_remote(tokenizer_path)
                             else str(pathlib.Path(tokenizer_path).absolute()))
    config_lib.check(c)
    return c


def open_weights(hf_dir: pathlib.Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Tensor name -> its safetensors file, opened (memory-mapped, nothing read) until
    `stack` closes; a missing or damaged file is a UserError."""
    from safetensors import SafetensorError, safe_open

    handles: dict[str, Any] = {}
    where = safetensors_out.weight_files(hf_dir)
    for fname in dict.fromkeys(where.values()):
        try:
            handles[fname] = stack.enter_context(safe_open(str(hf_dir / fname),
                                                           framework="numpy"))
        except (OSError, SafetensorError) as e:
            raise UserError(f"{hf_dir / fname} cannot be read ({e})",
                            "pass an intact model directory (export it again)") from None
    return {name: handles[fname] for name, fname in where.items()}


def check_tensors(files: dict[str, Any], m: ml_collections.ConfigDict) -> None:
    """Every tensor the config implies is in the open safetensors `files` (by tensor name)
    with the shape it implies (a UserError otherwise); reads no data."""
    for e in weights.entries(m):
        if e.hf_name not in files:
            raise UserError(f"the model directory has no tensor {e.hf_name}",
                            "export the model again with `python -m gopher_jax export hf`")
        shape = tuple(files[e.hf_name].get_slice(e.hf_name).get_shape())
        if shape != e.hf_shape:
            raise UserError(f"{e.hf_name} has shape {shape}, the config implies {e.hf_shape}",
                            "pass an intact model directory")


def load_params(files: dict[str, Any], m: ml_collections.ConfigDict, abstract: Any) -> Any:
    """The params `abstract` describes (ShapeDtypeStructs with shardings), each device's
    part read from the safetensors `files` on its own: the host holds one part at a time,
    never a whole tensor of a sharded param, let alone the model."""
    sources = weights.by_param(m)

    def load(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        found = sources[tuple(str(getattr(k, "key", k)) for k in path)]
        dtype = np.dtype(leaf.dtype)

        def part(index: tuple[slice, ...]) -> np.ndarray:
            if found[0].layer is None:
                (e,) = found
                return e.from_hf(files[e.hf_name].get_slice(e.hf_name), index).astype(
                    dtype, copy=False)
            layers = range(*index[0].indices(leaf.shape[0]))
            return np.stack([found[i].from_hf(files[found[i].hf_name].get_slice(
                found[i].hf_name), index[1:]).astype(dtype, copy=False) for i in layers])

        return jax.make_array_from_callback(leaf.shape, leaf.sharding, part)

    return jax.tree_util.tree_map_with_path(load, abstract)


def import_hf(hf_dir: str | os.PathLike, workdir: str | os.PathLike) -> dict[str, Any]:
    """Writes the new workdir (see the module docstring); returns {"workdir", "step",
    "source_step", "params"}."""
    from gopher_jax import checkpoint as ckpt_lib
    from gopher_jax.layout import Layout
    from gopher_jax.parallel import mesh as mesh_lib
    from gopher_jax.train import state as state_lib

    hf_dir = pathlib.Path(hf_dir)
    hf = read_config(hf_dir)
    workdir_path = storage.path(workdir)
    if checkpoint_steps(workdir):
        raise UserError(f"workdir {workdir} already has checkpoints",
                        "import into a new --workdir")
    tokenizer_path = workdir_path / export_lib.TOKENIZER_FILE
    c = run_config(hf, tokenizer_path)
    m = c.model
    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(c, mesh)
    with contextlib.ExitStack() as stack:
        files = open_weights(hf_dir, stack)
        check_tensors(files, m)
        params = load_params(files, m, layout.state["params"])
    state = state_lib.create_state(c, layout)
    state["params"] = params
    if c.train.master_fp32:  # the optimiser's copy starts from the imported weights too
        state["opt_state"]["master"] = jax.jit(
            lambda p: jax.tree.map(lambda x: x.astype(np.float32), p),
            out_shardings=layout.state_shardings["opt_state"]["master"])(params)

    source = hf.get("gopher_jax") or {}
    meta = dataclasses.replace(ckpt_lib.meta_for(c, 0, mesh), hf_import={
        "from": str(hf_dir.absolute()), "step": int(source.get("step", 0)),
        "eval": source.get("eval")})
    workdir_path.mkdir(parents=True, exist_ok=True)
    with ckpt_lib.WorkdirLock(workdir):
        storage.write_atomic(tokenizer_path, (hf_dir / export_lib.TOKENIZER_FILE).read_bytes())
        storage.write_atomic(workdir_path / workdir_lib.CONFIG_JSON, c.to_json(indent=2))
        storage.write_atomic(workdir_path / "experiment.py", EXPERIMENT_PY)
        ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
        try:
            ckpt.save(0, state, meta, force=True)
        finally:
            ckpt.close()
    return {"workdir": str(workdir), "step": 0, "source_step": int(source.get("step", 0)),
            "params": sizes.param_counts(m)["total"]}
