"""`import hf`: a Gopher model directory (as `export hf` writes it) as a new workdir whose step 0
checkpoint holds its weights, for `eval`, `sample`, `tasks` and fine-tuning with `train`.

The workdir gets:
    checkpoints/0/        the train state: the imported params, a fresh optimiser state
    config.json           the run config the model was exported with (data.tokenizer_path
                          pointing at the copy below), as `train` writes it
    tokenizer.model       the directory's SentencePiece model
    experiment.py         a config file that loads config.json, for `train --config`
                          (fine-tuning: `--config.train.steps=...` and any other schedule)

The checkpoint's metadata records the training steps and eval numbers behind the weights,
so that exporting it again writes the same directory, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
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
    if not safetensors_out.weight_files(hf_dir):
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
    c.data.tokenizer_path = str(pathlib.Path(tokenizer_path).absolute())
    config_lib.check(c)
    return c


def read_tensors(hf_dir: str | os.PathLike, m: ml_collections.ConfigDict
                 ) -> dict[str, np.ndarray]:
    """The model's tensors by HF name (the safetensors library reads them), checked
    against the shapes the config implies."""
    from safetensors import safe_open

    hf_dir = pathlib.Path(hf_dir)
    where = safetensors_out.weight_files(hf_dir)
    out: dict[str, np.ndarray] = {}
    by_file: dict[str, list[weights.Entry]] = {}
    for e in weights.entries(m):
        if e.hf_name not in where:
            raise UserError(f"{hf_dir} has no tensor {e.hf_name}",
                            "export the model again with `python -m gopher_jax export hf`")
        by_file.setdefault(where[e.hf_name], []).append(e)
    for fname, entries in by_file.items():
        with safe_open(str(hf_dir / fname), framework="flax") as f:
            for e in entries:
                a = np.asarray(f.get_tensor(e.hf_name))
                if tuple(a.shape) != e.hf_shape:
                    raise UserError(f"{e.hf_name} has shape {tuple(a.shape)}, the config "
                                    f"implies {e.hf_shape}", "pass an intact model directory")
                out[e.hf_name] = a
    return out


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
    tokenizer_path = pathlib.Path(workdir_path) / export_lib.TOKENIZER_FILE
    c = run_config(hf, tokenizer_path)
    m = c.model
    tensors = read_tensors(hf_dir, m)
    dtype = np.dtype(m.param_dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), weights.assemble(m, tensors))
    del tensors

    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(c, mesh)
    params = jax.device_put(params, layout.param_shardings)
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
        shutil.copyfile(hf_dir / export_lib.TOKENIZER_FILE, tokenizer_path)
        (workdir_path / workdir_lib.CONFIG_JSON).write_text(c.to_json(indent=2))
        (workdir_path / "experiment.py").write_text(EXPERIMENT_PY)
        ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
        try:
            ckpt.save(0, state, meta, force=True)
        finally:
            ckpt.close()
    return {"workdir": str(workdir), "step": 0, "source_step": int(source.get("step", 0)),
            "params": sizes.param_counts(m)["total"]}
