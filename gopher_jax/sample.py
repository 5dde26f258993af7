"""`python -m gopher_jax sample`: text from a trained workdir (temperature, top-k, seed).

Each new token re-runs the model over the last data.seq_len tokens of the context: simple
and exact for these sizes; a KV cache (with relative positions, a cache of keys plus the
position term) is not built yet.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gopher_jax.data import pipeline
from gopher_jax.errors import UsageError
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
    window = c.data.seq_len  # the longest context the model was trained on
    for _ in range(max_new_tokens):
        context = ids[-window:]
        n = len(context)
        width = max(16, 1 << (n - 1).bit_length())
        toks = jnp.asarray(np.pad(np.array(context, np.int32), (0, width - n)))[None]
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


def check_options(vocab_size: int, max_new_tokens: int, temperature: float,
                  top_k: int) -> None:
    """Refuses sampling options that would fail or silently do something else."""
    if max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens={max_new_tokens} must be >= 1",
                         "ask for at least one token")
    if not temperature >= 0:
        raise UsageError(f"--temperature={temperature} must be >= 0",
                         "use 0 for greedy decoding, about 0.7-1.0 to sample")
    if top_k < 0 or top_k > vocab_size:
        raise UsageError(f"--top_k={top_k} is outside 0..{vocab_size} (the vocabulary size)",
                         f"use 0 for all tokens or a value up to {vocab_size}")


def run(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, prompt: str,
        max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 40,
        seed: int = 0) -> dict[str, object]:
    """{"text": prompt + continuation, "notices": [...]} from the workdir's newest checkpoint.

    A prompt longer than the context (data.seq_len tokens) keeps its last tokens, with a
    notice saying how many were dropped.
    """
    from gopher_jax.evaluate import restore_params

    check_options(c.model.vocab_size, max_new_tokens, temperature, top_k)
    params, _ = restore_params(c, workdir, mesh_lib.make_mesh(c))
    params = jax.device_get(params)
    tok = pipeline.load_tokenizer(c)
    # Documents start with EOS in training data, so a prompt does too.
    ids = [tok.eos_id] + tok.encode(prompt)
    notices = []
    if len(ids) > c.data.seq_len:
        dropped = len(ids) - c.data.seq_len
        notices.append(f"the prompt is {len(ids) - 1} tokens, longer than the model's context "
                       f"of {c.data.seq_len}: its first {dropped} token(s) are not seen")
    new = generate(c, params, ids, max_new_tokens, temperature, top_k, seed, tok.eos_id)
    return {"text": prompt + tok.decode(new), "notices": notices}
