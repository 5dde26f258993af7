"""Exact dedup, MinHash near-dedup and test-set filtering over sharded files: the results of
dedup.py's whole-corpus functions, computed by tasks that each hold a bounded part.

Every task of a stage owns a slice of the work, decided by `owner` (a shard index, or a
hash partition, modulo the task count), and writes fixed-dtype binary records (`.bin`,
raw numpy bytes, no pickle), each file whole (a rename on a file system, one upload to a
gs:// folder, which every task of a cluster sees):

1. `Emitter`  (per task t: its     hash/p<p>/t<t>.bin      (text hash, id) by hash partition
              shards t, t+N, ...)  band/p<p>/t<t>.bin      (band, 5 band rows, text hash, doc)
                                   for every band of every signature, by band-key partition
2. `partition` (per partition p)   exact/g<g>/p<p>.bin     (removed id, kept id): a text hash's
                                   smallest id stays
                                   cand/g<g>/p<p>.bin      (i, j) LSH candidate pairs
3. `confirm`  (per owner g)        edges/g<g>.bin          candidate pairs with exact 13-gram
                                   Jaccard >= 0.8 (train-train)
                                   test/g<g>.bin           (train id, eval index) likewise
4. `cluster`  (one task)           near/g<g>.bin           (removed id, cluster's smallest id)
5. `removals` (per owner g)        what each of g's shards loses, by stage

Stage 1 writes tasks x partitions x 2 objects, whatever the shard count (per shard it
would be shards x partitions x 2: MassiveText's 2.2 million shards on 2,048 tasks, 9e9;
per task 8.4 million). A stage-1 task keeps at most `spill_bytes` of each kind in memory
(a band record is 58 bytes, 20 per document; engine.py derives it from the task budget) and
spills the rest, sorted by partition, to a local temporary folder: about 1.2 KB of local
disk per document of the task. A stage-2 result does not depend on the order of its input
files or records, nor on the number of partitions (groups are sorted by key, a group's
documents by id; a key's records are all in one partition).

Memory per task: stage 1 one shard and about twice `spill_bytes` per kind, stage 2 1/P of
the band records, stage 3 its candidate pairs and at most CACHE_SHARDS shards' 13-gram sets,
stage 4 the confirmed edges (documents that have a near duplicate, not the corpus: the same
as datatrove's MinhashDedupCluster). No task holds a whole-corpus structure.

Why our own steps and not datatrove's MinhashDedup{Signature,Buckets,Cluster,Filter}: those
decide duplicates by bucket collisions alone (every candidate pair is a duplicate), so the
paper's 0.8 Jaccard is never checked; here each candidate pair is confirmed on its two exact
13-gram sets (stage 3), as dedup.near_duplicates does, and test-set filtering (pairs with an
evaluation document) shares the buckets. The layout (signature buckets as sorted sharded
files, a single clustering task over duplicate pairs only) follows datatrove's.

Equal to dedup.py, document for document: exact duplicates are dropped inside each bucket by
keeping the smallest id per text hash (an exact copy has the same signature, so its kept twin
is in every bucket it is in: the candidates are those among exact-dedup survivors, as in
corpus_filter._stage2); clusters keep their smallest id; a training document's test-set
match is the smallest evaluation index it matches.
"""

from __future__ import annotations

import collections
import pathlib
import tempfile
from collections.abc import Callable, Iterable

import numpy as np

from gopher_jax import storage
from gopher_jax.data import dedup

HASH_REC = np.dtype([("hash", "<u8"), ("id", "<i8")])
BAND_REC = np.dtype([("band", "<u2"), ("key", "<u8", (dedup.ROWS,)), ("hash", "<u8"),
                     ("doc", "<i8")])  # doc >= 0: a training id; -(e + 1): evaluation doc e
PAIR_REC = np.dtype([("a", "<i8"), ("b", "<i8")])
CACHE_SHARDS = 4  # shards' 13-gram sets a confirmation task keeps loaded


def write_bin(path: pathlib.Path, records: np.ndarray) -> None:
    """Records to `path` (local, or a gs:// epath): whole or not at all, so a killed task
    leaves no finished-looking file (storage.write_atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, records.tobytes())


def read_bin(path: pathlib.Path, dtype: np.dtype) -> np.ndarray:
    """One `.bin` file's records (empty when there is none)."""
    try:
        return np.frombuffer(path.read_bytes(), dtype)
    except FileNotFoundError:
        return np.zeros(0, dtype)


def read_bins(folder: pathlib.Path, dtype: np.dtype) -> np.ndarray:
    """Every `.bin` of a folder, concatenated in name order (empty when none)."""
    parts = [np.frombuffer(f.read_bytes(), dtype)
             for f in sorted(folder.glob("*.bin"), key=lambda f: f.name)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    return (dedup._splitmix64(values.astype(np.uint64)) % np.uint64(partitions)).astype(np.int64)


def _band_records(docs: np.ndarray, hashes: np.ndarray | None,
                  sigs: np.ndarray) -> np.ndarray:
    n = len(docs)
    rec = np.zeros(n * dedup.BANDS, BAND_REC)
    rec["band"] = np.tile(np.arange(dedup.BANDS, dtype=np.uint16), n)
    rec["key"] = sigs.reshape(n * dedup.BANDS, dedup.ROWS)
    rec["hash"] = np.repeat(hashes if hashes is not None else np.zeros(n, np.uint64),
                            dedup.BANDS)
    rec["doc"] = np.repeat(docs, dedup.BANDS)
    return rec


class _Records:
    """One task's records of one kind, kept by partition: at most `spill_bytes` in memory,
    the rest in runs (sorted by partition, stably) in a local folder; `write` puts each
    partition's file together from its slice of every run, records in the order added."""

    def __init__(self, dtype: np.dtype, partitions: int, spill: pathlib.Path,
                 spill_bytes: int):
        self._dtype, self._partitions = dtype, partitions
        self._spill, self._spill_bytes = spill, spill_bytes
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._bytes = 0
        self._runs: list[tuple[pathlib.Path, np.ndarray]] = []  # (file, partition offsets)

    @property
    def runs(self) -> int:
        """Runs spilled to the local folder so far."""
        return len(self._runs)

    def add(self, rec: np.ndarray, part: np.ndarray) -> None:
        self._buf.append((rec, part))
        self._bytes += rec.nbytes
        if self._bytes >= self._spill_bytes:
            self._to_run()

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """The buffer's records sorted by partition (stable) and each partition's start."""
        rec = np.concatenate([r for r, _ in self._buf]) if self._buf \
            else np.zeros(0, self._dtype)
        part = np.concatenate([p for _, p in self._buf]) if self._buf \
            else np.zeros(0, np.int64)
        self._buf, self._bytes = [], 0
        order = np.argsort(part, kind="stable")
        counts = np.bincount(part, minlength=self._partitions)
        return rec[order], np.concatenate([[0], np.cumsum(counts)])

    def _to_run(self) -> None:
        rec, offsets = self._sorted()
        f = self._spill / f"run{len(self._runs):05d}.bin"
        rec.tofile(f)
        self._runs.append((f, offsets))

    def write(self, folder: pathlib.Path, name: str) -> None:
        """`folder/p<p>/<name>.bin` for every partition p (empty ones too)."""
        if self._runs and self._buf:
            self._to_run()
        if not self._runs:
            rec, offsets = self._sorted()
            slices = [[rec[offsets[p]:offsets[p + 1]]] for p in range(self._partitions)]
        else:
            maps = [(np.memmap(f, self._dtype, mode="r"), o) for f, o in self._runs]
            slices = [[m[o[p]:o[p + 1]] for m, o in maps] for p in range(self._partitions)]
        for p, parts in enumerate(slices):
            rec = np.concatenate(parts)
            write_bin(folder / f"p{p:05d}" / f"{name}.bin", rec)


class Emitter:
    """Stage 1 for one task: every shard's hash records (training shards) and band records,
    by partition; on a clean exit one file per partition and kind for the whole task,
    `hash/p<p>/t<rank>.bin` and `band/p<p>/t<rank>.bin` (a rerun writes the same names and
    bytes). Memory: at most `spill_bytes` per kind, the rest spilled to a local temporary
    folder (removed on exit, also when the task fails)."""

    def __init__(self, folder: pathlib.Path, rank: int, partitions: int,
                 spill_bytes: int):
        self._folder, self._rank, self._partitions = folder, rank, partitions
        self._spill_bytes = spill_bytes

    def __enter__(self) -> Emitter:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"gopher_jax-emit-t{self._rank}-")
        spill = pathlib.Path(self._tmp.name)
        (spill / "hash").mkdir()
        (spill / "band").mkdir()
        self._hash = _Records(HASH_REC, self._partitions, spill / "hash", self._spill_bytes)
        self._band = _Records(BAND_REC, self._partitions, spill / "band", self._spill_bytes)
        return self

    @property
    def spilled_runs(self) -> int:
        """Runs of either kind written to the local folder (0: all held in memory)."""
        return self._hash.runs + self._band.runs

    def add(self, docs: np.ndarray, hashes: np.ndarray | None, sigs: np.ndarray) -> None:
        """One shard's documents (ids, or -(eval index + 1) with `hashes` None), their text
        hashes and MinHash signatures."""
        if hashes is not None:
            rec = np.zeros(len(docs), HASH_REC)
            rec["hash"], rec["id"] = hashes, docs
            self._hash.add(rec, _partition_of(rec["hash"], self._partitions))
        rec = _band_records(docs, hashes, sigs)
        self._band.add(rec, _partition_of(rec["key"][:, 0] ^ rec["band"].astype(np.uint64),
                                          self._partitions))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                name = f"t{self._rank:05d}"
                self._hash.write(self._folder / "hash", name)
                self._band.write(self._folder / "band", name)
        finally:
            self._tmp.cleanup()


def _groups(keys: list[np.ndarray]) -> Iterable[np.ndarray]:
    """Index arrays of runs of equal keys (lexsorted), runs of 2+ only."""
    order = np.lexsort(keys[::-1])
    if len(order) < 2:
        return []
    sk = [k[order] for k in keys]
    change = np.zeros(len(order) - 1, bool)
    for k in sk:
        change |= k[1:] != k[:-1]
    starts = np.concatenate([[0], np.nonzero(change)[0] + 1])
    ends = np.concatenate([starts[1:], [len(order)]])
    return [order[s:e] for s, e in zip(starts, ends, strict=True) if e - s > 1]


def partition(folder: pathlib.Path, p: int, owner: Callable[[np.ndarray], np.ndarray],
              owners: int) -> None:
    """Stage 2 for partition p: exact duplicates of its hashes, LSH candidate pairs of its
    bands; each result split by the owner of its first document."""
    h = read_bins(folder / "hash" / f"p{p:05d}", HASH_REC)
    removed = []
    for g in _groups([h["hash"]]):
        ids = np.sort(h["id"][g])
        removed += [(int(i), int(ids[0])) for i in ids[1:]]
    _by_owner(folder / "exact", f"p{p:05d}", np.array(removed, np.int64).reshape(-1, 2), owner,
              owners)
    b = read_bins(folder / "band" / f"p{p:05d}", BAND_REC)
    keys = [b["band"].astype(np.uint64)] + [b["key"][:, r] for r in range(dedup.ROWS)]
    pairs: set[tuple[int, int]] = set()
    for g in _groups(keys):
        docs, hashes = b["doc"][g], b["hash"][g]
        train = docs >= 0
        first: dict[int, int] = {}
        for d, hh in zip(docs[train].tolist(), hashes[train].tolist(), strict=True):
            if hh not in first or d < first[hh]:
                first[hh] = d  # exact copies: only the smallest id takes part
        t = sorted(first.values())
        e = sorted(set(docs[~train].tolist()))  # -(eval index + 1)
        pairs.update((t[x], t[y]) for x in range(len(t)) for y in range(x + 1, len(t)))
        pairs.update((i, j) for i in t for j in e)
    arr = np.array(sorted(pairs), np.int64).reshape(-1, 2)
    _by_owner(folder / "cand", f"p{p:05d}", arr, owner, owners)


def _by_owner(folder: pathlib.Path, name: str, pairs: np.ndarray,
              owner: Callable[[np.ndarray], np.ndarray], owners: int) -> None:
    rec = np.zeros(len(pairs), PAIR_REC)
    rec["a"], rec["b"] = pairs[:, 0], pairs[:, 1]
    who = owner(rec["a"]) if len(rec) else np.zeros(0, np.int64)
    for g in range(owners):
        write_bin(folder / f"g{g:05d}" / f"{name}.bin", rec[who == g])


class ShardSets:
    """13-gram sets by document, loaded a shard at a time (at most CACHE_SHARDS kept)."""

    def __init__(self, load: Callable[[int], tuple[np.ndarray, list[np.ndarray]]],
                 shard_of: Callable[[int], int]):
        self._load, self._shard_of = load, shard_of
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, list]] = \
            collections.OrderedDict()

    def get(self, doc: int) -> np.ndarray:
        k = self._shard_of(doc)
        if k in self._cache:
            self._cache.move_to_end(k)
        else:
            self._cache[k] = self._load(k)
            while len(self._cache) > CACHE_SHARDS:
                self._cache.popitem(last=False)
        ids, sets = self._cache[k]
        row = int(np.searchsorted(ids, doc))
        return sets[row]


def confirm(folder: pathlib.Path, g: int, sets: ShardSets,
            threshold: float = dedup.JACCARD) -> None:
    """Stage 3 for owner g: every candidate pair checked on its exact 13-gram sets; pairs in
    the order of their second document's shard, so each shard is loaded about once."""
    cand = np.unique(read_bins(folder / "cand" / f"g{g:05d}", PAIR_REC))
    shard_b = np.array([sets._shard_of(int(x)) for x in cand["b"]], np.int64)
    order = np.lexsort((cand["a"], shard_b))
    edges, test = [], []
    for a, b in zip(cand["a"][order].tolist(), cand["b"][order].tolist(), strict=True):
        if dedup.jaccard(sets.get(a), sets.get(b)) >= threshold:
            (edges if b >= 0 else test).append((a, b))
    write_bin(folder / "edges" / f"g{g:05d}.bin", _pairs(edges))
    write_bin(folder / "test" / f"g{g:05d}.bin", _pairs([(a, -b - 1) for a, b in test]))


def _pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
    rec = np.zeros(len(pairs), PAIR_REC)
    if pairs:
        a = np.array(pairs, np.int64)
        rec["a"], rec["b"] = a[:, 0], a[:, 1]
    return rec


def cluster(folder: pathlib.Path, owner: Callable[[np.ndarray], np.ndarray],
            owners: int) -> None:
    """Stage 4 (one task): connected components of the confirmed edges; every document but a
    component's smallest is removed in favour of it."""
    edges = read_bins(folder / "edges", PAIR_REC)
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(edges["a"].tolist(), edges["b"].tolist(), strict=True):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    removed = sorted((x, root(x)) for x in list(parent) if root(x) != x)
    _by_owner(folder / "near", "all", np.array(removed, np.int64).reshape(-1, 2), owner,
              owners)


def removals(folder: pathlib.Path, g: int) -> dict[str, dict[int, int]]:
    """Stage 5 for owner g: {stage: {removed id: matched}} for the documents g owns, as
    corpus_filter._stage2 computes them (near: not exact; test: neither; matched eval
    documents as indices)."""
    exact = {int(a): int(b) for a, b in read_bins(folder / "exact" / f"g{g:05d}", PAIR_REC)}
    near = {int(a): int(b) for a, b in read_bins(folder / "near" / f"g{g:05d}", PAIR_REC)
            if int(a) not in exact}
    test: dict[int, int] = {}
    rec = read_bin(folder / "test" / f"g{g:05d}.bin", PAIR_REC)
    for a, e in zip(rec["a"].tolist(), rec["b"].tolist(), strict=True):
        if a not in exact and a not in near and (a not in test or e < test[a]):
            test[a] = e
    return {"exact_dedup": exact, "near_dedup": near, "test_set": test}

