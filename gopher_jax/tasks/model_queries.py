"""Log-likelihoods and greedy continuations of many requests through a `Model`.

A `Model` answers fixed-shape batches: `score(inputs, targets)` gives each target token's
log-probability, `start(tokens, lengths, max_len)` and `next(state, tokens)` decode greedily
one token per row at a time. `ShardedModel` (tasks/run.py) runs a Gopher on a mesh with a KV
cache; `LogitsModel` wraps any `logits_fn(tokens[B, T]) -> logits[B, T, V]` (a stub, or the
unsharded forward) and decodes without a cache.

Packing (`pack`): requests are sorted by length and each goes to the smallest bucket width
(powers of two from 16, then the limit) that holds it; a batch holds requests of one bucket
only and the last batch of a bucket is filled with padding rows. A row's width then depends on
its own length alone, rows are right-padded (a causal model's positions never see what is
after them), and results come back in the requests' order: a row's result does not depend on
which rows share its batch, nor on the batch size. Few widths mean few compiles.

Context windows: a context keeps its last seq_len tokens (a log-likelihood window its last
seq_len + 1, continuation included). Greedy decoding does not slide that window: new tokens
see the whole context window and every token generated before them, so a row's context grows
to seq_len + max_new_tokens - 1 tokens (positions are relative; sample.py does the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]
MIN_BUCKET = 16
Request = tuple[Sequence[int], Sequence[int]]


class Model(Protocol):
    def score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """inputs, targets [B, W] int32 -> (log p(targets[b, t] | inputs[b, :t+1]) [B, W]
        float32, whether targets[b, t] is the argmax there [B, W] bool)."""
        ...

    def start(self, tokens: np.ndarray, lengths: np.ndarray, max_len: int
              ) -> tuple[np.ndarray, Any]:
        """Rows tokens[b, :lengths[b]] of [B, W] (zeros after) -> (the argmax token after
        each row [B] int32, a decoding state with room for max_len tokens per row)."""
        ...

    def next(self, state: Any, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        """tokens [B] appended to each row -> (the argmax token after them [B], the state)."""
        ...


def buckets(limit: int) -> list[int]:
    """The padded widths: powers of two from MIN_BUCKET below `limit`, then `limit`."""
    out, width = [], MIN_BUCKET
    while width < limit:
        out.append(width)
        width *= 2
    return out + [limit]


def bucket(length: int, limit: int) -> int:
    """The smallest bucket width that holds `length` tokens (<= limit)."""
    if not 1 <= length <= limit:
        raise ValueError(f"a row of {length} tokens: it must be 1..{limit}")
    return next(w for w in buckets(limit) if w >= length)


def pack(lengths: Sequence[int], batch_size: int, limit: int, packed: bool = True
         ) -> list[tuple[list[int], int]]:
    """Batches as (the indices of their rows, their padded width). Packed: indices sorted by
    length, grouped by bucket, batch_size per batch. Unpacked: in the given order, every batch
    padded to `limit` (the baseline packing is measured against)."""
    if not packed:
        return [(list(range(i, min(i + batch_size, len(lengths)))), limit)
                for i in range(0, len(lengths), batch_size)]
    by_bucket: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        by_bucket.setdefault(bucket(lengths[i], limit), []).append(i)
    return [(idx[i:i + batch_size], width) for width, idx in sorted(by_bucket.items())
            for i in range(0, len(idx), batch_size)]


def _padded(rows: Sequence[Sequence[int]], batch_size: int, width: int) -> np.ndarray:
    """[batch_size, width] int32: each row on the left, zeros after it and in the extra rows."""
    tokens = np.zeros((batch_size, width), np.int32)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row
    return tokens


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Uncached:
    """Greedy decoding without a cache: every token re-runs the model over each row's whole
    sequence, right-padded to max_len. Subclasses give `argmax_at`."""

    def argmax_at(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """tokens [B, S], lengths [B] -> the argmax token after tokens[b, :lengths[b]] [B]."""
        raise NotImplementedError

    def start(self, tokens: np.ndarray, lengths: np.ndarray, max_len: int
              ) -> tuple[np.ndarray, Any]:
        buf = np.zeros((tokens.shape[0], max_len), np.int32)
        buf[:, :tokens.shape[1]] = tokens
        lengths = np.asarray(lengths, np.int32)
        return self.argmax_at(buf, lengths), (buf, lengths)

    def next(self, state: Any, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        buf, lengths = state
        if lengths.max() >= buf.shape[1]:
            raise ValueError(f"no room left: decoding was started with max_len {buf.shape[1]}")
        buf = buf.copy()
        buf[np.arange(len(lengths)), lengths] = tokens
        lengths = lengths + 1
        return self.argmax_at(buf, lengths), (buf, lengths)


class LogitsModel(Uncached):
    """A `logits_fn(tokens[B, T]) -> logits[B, T, V]` as a Model, scored on the host."""

    def __init__(self, logits_fn: LogitsFn):
        self.logits_fn = logits_fn

    def score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = np.asarray(self.logits_fn(inputs))
        logp = _log_softmax(logits)
        picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return picked, np.argmax(logits, axis=-1) == targets

    def argmax_at(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.logits_fn(tokens))
        return np.argmax(logits[np.arange(len(lengths)), lengths - 1], axis=-1).astype(np.int32)


def as_model(model: Model | LogitsFn) -> Model:
    """A Model as given; a bare logits_fn wrapped in LogitsModel."""
    return model if hasattr(model, "score") else LogitsModel(model)


def scored(model: Model | LogitsFn, requests: Sequence[Request], seq_len: int,
           batch_size: int, packed: bool = True) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), whether every continuation token is the argmax)
    for each (context ids, continuation ids), in the requests' order; the context loses its
    first tokens when both do not fit in seq_len + 1 tokens."""
    model = as_model(model)
    windows = []
    for context, continuation in requests:
        if not 1 <= len(continuation) <= seq_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens: it must be "
                             f"1..{seq_len} (data.seq_len)")
        if not context:
            raise ValueError("a context needs at least one token (start with EOS)")
        windows.append((list(context) + list(continuation))[-(seq_len + 1):])
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for idx, width in pack([len(w) - 1 for w in windows], batch_size, seq_len, packed):
        rows = [windows[i] for i in idx]
        logp, top = model.score(_padded([w[:-1] for w in rows], batch_size, width),
                                _padded([w[1:] for w in rows], batch_size, width))
        for r, i in enumerate(idx):
            end = len(rows[r]) - 1
            span = slice(end - len(requests[i][1]), end)
            out[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(top[r, span].all()))
    return out


def loglikelihoods(model: Model | LogitsFn, requests: Sequence[Request], seq_len: int,
                   batch_size: int, packed: bool = True) -> list[float]:
    """sum log p(continuation | context) for each (context ids, continuation ids): `scored`'s
    first half."""
    return [lp for lp, _ in scored(model, requests, seq_len, batch_size, packed)]


def greedy(model: Model | LogitsFn, contexts: Sequence[Sequence[int]], max_new_tokens: int,
           seq_len: int, batch_size: int, done: Callable[[list[int]], bool],
           packed: bool = True) -> list[list[int]]:
    """Up to max_new_tokens argmax tokens after each context's last seq_len tokens, in the
    contexts' order; a row stops once done(its new tokens) is true, a batch once all its rows
    have stopped. New tokens see the whole window and the tokens before them (no sliding)."""
    if any(not c for c in contexts):
        raise ValueError("a context needs at least one token (start with EOS)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: it must be >= 1")
    model = as_model(model)
    windows = [list(c)[-seq_len:] for c in contexts]
    out: list[list[int]] = [[] for _ in contexts]
    for idx, width in pack([len(w) for w in windows], batch_size, seq_len, packed):
        lengths = np.ones(batch_size, np.int32)  # padding rows: one token 0
        lengths[:len(idx)] = [len(windows[i]) for i in idx]
        tokens, state = model.start(_padded([windows[i] for i in idx], batch_size, width),
                                    lengths, width + max_new_tokens - 1)
        live = list(range(len(idx)))
        for n in range(1, max_new_tokens + 1):
            for r in live:
                out[idx[r]].append(int(tokens[r]))
            live = [r for r in live if not done(out[idx[r]])]
            if not live or n == max_new_tokens:
                break
            tokens, state = model.next(state, np.asarray(tokens, np.int32))
    return out
