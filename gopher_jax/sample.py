"""`python -m gopher_jax sample`: text from a trained workdir (temperature, top-k, seed).

Each new token re-runs the model over the whole context: simple and exact for these sizes;
a KV cache (with relative positions, a cache of keys plus the position term) is not built yet.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gopher_jax.data import pipeline
from gopher_jax.model import gopher
from gopher_jax.parallel import mesh as mesh_lib


def generate(c: ml_collections.ConfigDict, params, prompt_ids: list[int], max_new_tokens: int,
             temperature: float, top_k: int, seed: int, eos_id: int) -> list[int]:
    """Autoregressive sampling; the context is padded to a power of two to limit compiles."""
    graphdef, _ = gopher.abstract(c.model)

    @jax.jit
    def next_logits(params, tokens, length):
        logits = gopher.apply(graphdef, params, tokens)
        return jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False)

    ids = list(prompt_ids)
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        n = len(ids)
        width = max(16, 1 << (n - 1).bit_length())
        toks = jnp.asarray(np.pad(np.array(ids, np.int32), (0, width - n)))[None]
        logits = next_logits(params, toks, n)
        if temperature <= 0:
            nxt = int(jnp.argmax(logits))
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = jax.lax.top_k(logits, top_k)[0][-1]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits))
        if nxt == eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


def main(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, prompt: str,
         max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 40,
         seed: int = 0) -> str:
    from gopher_jax.evaluate import restore_params

    mesh = mesh_lib.make_mesh(c)
    params, _ = restore_params(c, workdir, mesh)
    params = jax.device_get(params)
    tok = pipeline.load_tokenizer(c)
    # Documents start with EOS in training data, so a prompt does too.
    ids = [tok.eos_id] + tok.encode(prompt)
    new = generate(c, params, ids, max_new_tokens, temperature, top_k, seed, tok.eos_id)
    return prompt + tok.decode(new)
