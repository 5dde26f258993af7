"""Exact and near-duplicate removal, and test-set filtering (Gopher paper, appendix A).

    sh = shingles(text)                          # uint64 hashes of the doc's word 13-grams
    sig = signature(sh)                          # MinHash, [NUM_PERM] uint64
    keep = near_duplicates(ids, sigs, shingle_sets)   # {removed id: kept id}
    hits = test_set_overlap(train..., eval...)   # {train id: eval id}

Near duplicates: two documents whose sets of word 13-grams have Jaccard similarity >= 0.8.
Candidate pairs come from MinHash with locality-sensitive hashing (BANDS bands of ROWS
rows: a pair at Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8**5)**20 >
0.9996); each candidate pair is then *checked exactly* on its two 13-gram sets, so a
removal always means Jaccard >= 0.8. Documents joined by such pairs form clusters; each
cluster keeps its smallest document id (its first in the corpus' order) and loses the rest.

Why by hand: datatrove's MinhashDedup decides duplicates by bucket collisions alone (the
0.8 of the paper is only implied by its band sizes, never checked), runs as four disk stages
meant for a cluster, and shingles through its word tokenizer (spaCy for English, see
filters.py); test-set filtering by Jaccard against evaluation documents is not in it.
Words are runs of non-whitespace, as in filters.py; hashes are stable across processes
(blake2b, never Python's salted `hash`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

NGRAM = 13
JACCARD = 0.8
BANDS, ROWS = 20, 5
NUM_PERM = BANDS * ROWS
_SEED = 0x60FE5
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (uint64 in, uint64 out; wraps on overflow)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_PERM_KEYS = _splitmix64(np.arange(NUM_PERM, dtype=np.uint64) + np.uint64(_SEED))


def text_hash(text: str) -> int:
    """A 64-bit content hash of a document (exact duplicates share it)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _word_hashes(words: list[str]) -> np.ndarray:
    cache: dict[str, int] = {}
    out = np.empty(len(words), np.uint64)
    for i, w in enumerate(words):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(
                hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "big")
        out[i] = h
    return out


def shingles(text: str, n: int = NGRAM) -> np.ndarray:
    """The sorted unique uint64 hashes of the document's word n-grams; a document shorter
    than n words is one shingle (all its words)."""
    w = _word_hashes(text.split())
    if len(w) == 0:
        return np.zeros(0, np.uint64)
    m = max(len(w) - n + 1, 1)
    width = min(n, len(w))
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):  # an order-sensitive combination of the n word hashes
            h = _splitmix64(h ^ w[k:k + m])
    return np.unique(h)


SIGNATURE_BLOCK = 512  # shingles hashed at once: ~1.2 MB of temporaries, any document


def signature(sh: np.ndarray, block: int = SIGNATURE_BLOCK) -> np.ndarray:
    """MinHash of a shingle set: [NUM_PERM] uint64, the minimum of each keyed hash (taken
    block by block: the same minimum for any block size)."""
    sig = np.full(NUM_PERM, _MASK, np.uint64)
    for start in range(0, len(sh), block):
        part = sh[start:start + block]
        hashed = _splitmix64(part[:, None] ^ _PERM_KEYS[None, :])  # [block, NUM_PERM]
        sig = np.minimum(sig, hashed.min(axis=0))
    return sig


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique shingle arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _band_keys(sigs: np.ndarray) -> np.ndarray:
    """[docs, BANDS] bytes keys of each band of each signature."""
    bands = np.ascontiguousarray(sigs.reshape(len(sigs), BANDS, ROWS))
    return bands.view(f"V{8 * ROWS}").reshape(len(sigs), BANDS)


def candidate_pairs(sigs: np.ndarray) -> set[tuple[int, int]]:
    """(i, j), i < j: rows of `sigs` that agree on at least one whole band."""
    pairs: set[tuple[int, int]] = set()
    keys = _band_keys(sigs)
    for b in range(BANDS):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, k in enumerate(keys[:, b].tolist()):
            buckets[k].append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    return pairs


def exact_duplicates(ids: Sequence[int], hashes: Sequence[int]) -> dict[int, int]:
    """{removed id: kept id}: documents whose text hash an earlier (smaller) id already has."""
    first: dict[int, int] = {}
    removed = {}
    for i, h in sorted(zip(ids, hashes, strict=True)):
        if h in first:
            removed[i] = first[h]
        else:
            first[h] = i
    return removed


def near_duplicates(ids: Sequence[int], sigs: np.ndarray, sets: Sequence[np.ndarray],
                    threshold: float = JACCARD) -> dict[int, int]:
    """{removed id: kept id}: clusters of documents joined by pairs with Jaccard >= threshold
    (checked exactly) each keep their smallest id; the result depends on the documents, not
    on their order in `ids`."""
    order = np.argsort(np.asarray(ids), kind="stable")
    ids = [ids[i] for i in order]
    sigs, sets = sigs[order], [sets[i] for i in order]
    parent = list(range(len(ids)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in sorted(candidate_pairs(sigs)):
        if jaccard(sets[i], sets[j]) >= threshold:
            ri, rj = root(i), root(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)  # the smaller index (id) stays the root
    return {ids[i]: ids[root(i)] for i in range(len(ids)) if root(i) != i}


def test_set_overlap(train_ids: Sequence[int], train_sigs: np.ndarray,
                     train_sets: Sequence[np.ndarray], eval_ids: Sequence[str],
                     eval_sigs: np.ndarray, eval_sets: Sequence[np.ndarray],
                     threshold: float = JACCARD) -> dict[int, str]:
    """{train id: the first evaluation id it matches}: training documents whose 13-gram
    Jaccard similarity with an evaluation document is >= threshold."""
    if len(eval_ids) == 0 or len(train_ids) == 0:
        return {}
    index: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(BANDS)]
    ekeys = _band_keys(eval_sigs)
    for e in range(len(eval_ids)):
        for b in range(BANDS):
            index[b][ekeys[e, b].tobytes()].append(e)
    hits: dict[int, str] = {}
    tkeys = _band_keys(train_sigs)
    for t in range(len(train_ids)):
        cands = sorted({e for b in range(BANDS) for e in index[b].get(tkeys[t, b].tobytes(), ())})
        for e in cands:
            if jaccard(train_sets[t], eval_sets[e]) >= threshold:
                hits[train_ids[t]] = eval_ids[e]
                break
    return hits
