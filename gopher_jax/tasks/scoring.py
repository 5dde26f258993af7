"""Log-likelihoods and greedy continuations through a `logits_fn(tokens[B, T]) -> logits[B, T, V]`.

Every call of logits_fn gets a [batch_size, seq_len] int32 array: rows padded on the right
(a causal model's positions never see what is after them) and the batch filled with padding
rows, so one shape is compiled and a row's result does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LogitsFn = Callable[[np.ndarray], np.ndarray]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _padded(rows: Sequence[Sequence[int]], batch_size: int, seq_len: int) -> np.ndarray:
    tokens = np.zeros((batch_size, seq_len), np.int32)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row
    return tokens


def loglikelihoods(logits_fn: LogitsFn, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   seq_len: int, batch_size: int) -> list[float]:
    """sum log p(continuation | context) for each (context ids, continuation ids); the context
    loses its first tokens when both do not fit in seq_len + 1 tokens."""
    windows = []
    for context, continuation in requests:
        if not 1 <= len(continuation) <= seq_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens: it must be "
                             f"1..{seq_len} (data.seq_len)")
        if not context:
            raise ValueError("a context needs at least one token (start with EOS)")
        windows.append((list(context) + list(continuation))[-(seq_len + 1):])
    out: list[float] = []
    for idx in _batches(len(requests), batch_size):
        rows = [windows[i] for i in idx]
        logp = _log_softmax(logits_fn(_padded([w[:-1] for w in rows], batch_size, seq_len)))
        for r, i in enumerate(idx):
            n = len(requests[i][1])
            length = len(rows[r]) - 1
            targets = np.asarray(rows[r][-n:])
            out.append(float(logp[r, np.arange(length - n, length), targets].sum()))
    return out


def greedy(logits_fn: LogitsFn, contexts: Sequence[Sequence[int]], max_new_tokens: int,
           seq_len: int, batch_size: int, done: Callable[[list[int]], bool]
           ) -> list[list[int]]:
    """Up to max_new_tokens argmax tokens after each context (its last seq_len tokens, a window
    that slides as tokens are added); a row stops once done(its new tokens) is true."""
    if any(not c for c in contexts):
        raise ValueError("a context needs at least one token (start with EOS)")
    out: list[list[int]] = [[] for _ in contexts]
    for idx in _batches(len(contexts), batch_size):
        live = list(idx)
        for _ in range(max_new_tokens):
            if not live:
                break
            windows = [(list(contexts[i]) + out[i])[-seq_len:] for i in live]
            logits = np.asarray(logits_fn(_padded(windows, batch_size, seq_len)))
            for r, i in enumerate(live):
                out[i].append(int(np.argmax(logits[r, len(windows[r]) - 1])))
            live = [i for i in live if not done(out[i])]
    return out
