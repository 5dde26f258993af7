"""Our model against transformers' run of its export: logits and greedy decoding.

Needs the `hf` extra (torch, transformers). The exported modeling file is loaded as any
outside user loads it: `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`,
in float32.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np


def load_model(hf_dir: str | os.PathLike) -> Any:
    """The export in `hf_dir` as transformers loads it, float32, in eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, dtype=torch.float32)
    return model.eval()


def their_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """transformers' [B, T, vocab] float32 logits of token ids [B, T]."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def our_logits(m: ml_collections.ConfigDict, params: Any, ids: np.ndarray) -> np.ndarray:
    """Our forward's [B, T, vocab] logits of token ids [B, T] (model config `m`)."""
    from gopher_jax.model import gopher

    graphdef, _ = gopher.abstract(m)
    # Full float32 matmuls, as torch computes them: on TPU (and GPU, TF32) the default
    # precision rounds float32 operands to fewer mantissa bits. XLA on CPU computes float32
    # dots in full at any precision setting.
    with jax.default_matmul_precision("highest"):
        return np.asarray(gopher.apply(graphdef, params, np.asarray(ids, np.int32)))


def max_logit_diff(m: ml_collections.ConfigDict, params: Any, model: Any,
                   ids: np.ndarray) -> float:
    """max |their logits - ours| over every position of `ids`."""
    return float(np.abs(their_logits(model, ids) - our_logits(m, params, ids)).max())


def their_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int,
                 eos_id: int) -> list[int]:
    """transformers' greedy `generate()` after the prompt, cut before the first EOS (where
    our `sample` stops; transformers keeps it)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False)[0, len(prompt_ids):].tolist()
    return out[:out.index(eos_id)] if eos_id in out else out
