"""`python -m gopher_jax sample`: text from a trained workdir (temperature, top-k, seed).

The prompt's last data.seq_len tokens fill a KV cache in one pass (model/decode.py); then each
new token is one cached step, and the whole loop (sampling, EOS) runs on device. New tokens
see the whole prompt window and every token generated before them, so the context grows to
data.seq_len + max_new_tokens (relative positions have no limit). The random key is split
once per sampled token.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gopher_jax import data
from gopher_jax.errors import UsageError
from gopher_jax.model import decode, gopher
from gopher_jax.parallel import mesh as mesh_lib


def generate(c: ml_collections.ConfigDict, params, prompt_ids: list[int], max_new_tokens: int,
             temperature: float, top_k: int, seed: int, eos_id: int) -> list[int]:
    """Up to max_new_tokens tokens after the prompt's last data.seq_len tokens, stopping before
    eos_id; temperature 0 is greedy, top_k 0 keeps every token. The prompt is padded to a
    power of two (at least 16) to limit compiles."""
    if not prompt_ids:
        raise ValueError("generate needs a prompt of at least one token")
    context = list(prompt_ids)[-c.data.seq_len:]
    n = len(context)
    width = max(16, 1 << (n - 1).bit_length())
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = context
    prefill, loop = _decoder(c.model, temperature <= 0, top_k)
    logits, cache = prefill(params, tokens, n, width + max_new_tokens)
    out, count = loop(params, cache, logits, jax.random.key(seed), jnp.float32(temperature),
                      jnp.int32(eos_id), max_new_tokens)
    return [int(t) for t in np.asarray(out)[:int(count)]]


_DECODERS: dict[tuple[str, bool, int], tuple[Callable, Callable]] = {}


def _decoder(m: ml_collections.ConfigDict, greedy: bool, top_k: int
             ) -> tuple[Callable, Callable]:
    """The jitted (prefill, loop) of a model config and sampling mode, built once per process."""
    key = (m.to_json(), greedy, top_k)
    if key not in _DECODERS:
        _DECODERS[key] = _build_decoder(m, greedy, top_k)
    return _DECODERS[key]


def _build_decoder(m: ml_collections.ConfigDict, greedy: bool, top_k: int
                   ) -> tuple[Callable, Callable]:
    graphdef, _ = gopher.abstract(m)

    @functools.partial(jax.jit, static_argnums=3)
    def prefill(params, tokens, length, max_len):
        return decode.prefill(nnx.merge(graphdef, params), tokens, max_len, length=length)

    def choose(logits: jax.Array, key: jax.Array, temperature: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
        """logits [V] -> (a token, the next key)."""
        if greedy:
            return jnp.argmax(logits).astype(jnp.int32), key
        logits = logits / temperature
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        key, sub = jax.random.split(key)
        return jax.random.categorical(sub, logits).astype(jnp.int32), key

    @functools.partial(jax.jit, static_argnums=6)
    def loop(params, cache, logits, key, temperature, eos_id, max_new):
        """-> (tokens [max_new] int32, how many of them were generated)."""
        def more(carry) -> jax.Array:
            i, done = carry[0], carry[-1]
            return (i < max_new) & ~done

        def body(carry):
            i, cache, logits, key, out, _ = carry
            tok, key = choose(logits[0], key, temperature)
            done = tok == eos_id
            out = out.at[i].set(tok)

            def advance(cache: decode.Cache) -> tuple[jax.Array, decode.Cache]:
                return decode.step(nnx.merge(graphdef, params), cache, tok[None])

            logits, cache = jax.lax.cond(done | (i + 1 >= max_new),
                                         lambda cache: (logits, cache), advance, cache)
            return i + (~done).astype(jnp.int32), cache, logits, key, out, done

        out = jnp.zeros((max_new,), jnp.int32)
        carry = (jnp.int32(0), cache, logits, key, out, jnp.bool_(False))
        i, _, _, _, out, _ = jax.lax.while_loop(more, body, carry)
        return out, i

    return prefill, loop


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
        seed: int = 0, int8: bool = False) -> dict[str, object]:
    """{"text": prompt + continuation, "notices": [...]} from the workdir's newest checkpoint.

    A prompt longer than the context (data.seq_len tokens) keeps its last tokens, with a
    notice saying how many were dropped. With `int8`, the weights are int8 (model/int8.py).
    """
    from gopher_jax.evaluate import restore_params

    check_options(c.model.vocab_size, max_new_tokens, temperature, top_k)
    params, _ = restore_params(c, workdir, mesh_lib.make_mesh(c), int8)
    params = jax.device_get(params)
    tok = data.load_tokenizer(c)
    # Documents start with EOS in training data, so a prompt does too.
    ids = [tok.eos_id] + tok.encode(prompt)
    notices = []
    if len(ids) > c.data.seq_len:
        dropped = len(ids) - c.data.seq_len
        notices.append(f"the prompt is {len(ids) - 1} tokens, longer than the model's context "
                       f"of {c.data.seq_len}: its first {dropped} token(s) are not seen")
    new = generate(c, params, ids, max_new_tokens, temperature, top_k, seed, tok.eos_id)
    return {"text": prompt + tok.decode(new), "notices": notices}
