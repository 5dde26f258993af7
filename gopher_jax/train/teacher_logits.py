"""A teacher's top-k next-token log-probs stored beside the token chunks, to distil from a
teacher too large to run beside the student.

`write` runs the teacher over every chunk of the training split in chunk order and keeps, for
each of a chunk's seq_len input positions, the k most likely next tokens and their
log-probabilities (at temperature 1): npy shards of ROWS_PER_SHARD chunks, `ids-NNNNN.npy`
(int32) and `logprobs-NNNNN.npy` (float32), each [rows, seq_len, k]; chunk i is row
i % ROWS_PER_SHARD of shard i // ROWS_PER_SHARD. manifest.json is written last (the teacher's
fingerprint, k, the chunks' and tokenizer's fingerprints, the shards): a folder without it
is unfinished. npy rather than pickle: plain arrays, memory-mapped when read.

`StoredTeacher` reads the rows of any chunk indices; `TeacherBatches` adds them to each
training batch as "teacher_ids" and "teacher_logprobs"; `StoredDistillation` is the loop's
objective (model/distillation.py's top-k KL).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from gopher_jax import data as data_lib
from gopher_jax import storage
from gopher_jax.data import artefacts
from gopher_jax.data import rows as rows_lib
from gopher_jax.layout import Layout
from gopher_jax.model import distillation
from gopher_jax.model.cross_entropy import _chunks, _unchunk
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.train import distill
from gopher_jax.train import step as step_lib

ROWS_PER_SHARD = 1024
MANIFEST = "manifest.json"
KEYS = ("teacher_ids", "teacher_logprobs")


def default_dir(c: ml_collections.ConfigDict, teacher: distill.Teacher, topk: int) -> epath.Path:
    """<chunks dir>/<train split>.teacher-<fingerprint>-top<k>: beside the split's chunks."""
    name = teacher.fingerprint.replace("@", "-")
    return artefacts.chunks_dir(c) / f"{c.data.train_split}.teacher-{name}-top{topk}"


def _topk_fn(teacher: distill.Teacher, layout: Layout, topk: int, chunk: int) -> Callable:
    def f(params: Any, tokens: jax.Array, seg: jax.Array) -> tuple[jax.Array, jax.Array]:
        with rules_lib.use_rules(layout.rules):
            model = nnx.merge(layout.graphdef, params)
            x = model.hidden(tokens[:, :-1], seg[:, :-1])
            w = model.output_embedding()
            t = x.shape[1]
            n = t // chunk if 0 < chunk < t and t % chunk == 0 else 1

            def body(carry: None, xc: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
                logits = jnp.einsum("btd,vd->btv", xc, w, preferred_element_type=jnp.float32)
                values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), topk)
                return None, (ids.astype(jnp.int32), values)

            _, (ids, values) = jax.lax.scan(body, None, _chunks(x, n))
            return _unchunk(ids), _unchunk(values)

    rows = layout.batch_sharding  # the batch split over the devices, as in training
    return jax.jit(f, in_shardings=(layout.param_shardings, rows, rows),
                   out_shardings=layout.replicated)


def write(c: ml_collections.ConfigDict, teacher: distill.Teacher, out: epath.Path, topk: int,
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Runs the teacher over the training split's chunks (c.train.batch_size at a time, the
    rows split over the mesh's batch axes, as in training) and writes the shards and the
    manifest (process 0). Every process of a multi-process launch takes part. Returns the
    manifest."""
    from gopher_jax.parallel import distributed

    distributed.initialize_from_env()
    info = data_lib.prepare(c)
    identity = data_lib.data_identity(info, c.data.train_split)
    distill.check_tokenizer(teacher, identity)
    data = data_lib.train_data(c)
    n, batch = data.num_chunks, c.train.batch_size
    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(teacher.config, mesh)
    params = distill.restore_params(teacher, layout)
    fn = _topk_fn(teacher, layout, topk, c.model.loss_chunk)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        # an old manifest would call the folder finished while its shards are rewritten
        (out / MANIFEST).unlink(missing_ok=True)
    shards = ShardWriter(out, writer)
    with jax.set_mesh(mesh):
        for start in range(0, n, batch):
            idx = np.arange(start, min(start + batch, n))
            rows = data.chunks.read(np.pad(idx, (0, batch - len(idx)), mode="edge"))
            tokens, seg = (jax.make_array_from_callback(a.shape, layout.batch_sharding,
                                                        lambda i, a=a: a[i])
                           for a in (rows["tokens"], rows["segment_ids"]))
            ids, logp = jax.device_get(fn(params, tokens, seg))
            shards.add(ids[:len(idx)], logp[:len(idx)])
            if (start // batch) % 50 == 0:
                log(f"teacher logits: {min(start + batch, n):,} of {n:,} chunks")
    manifest = {"teacher": teacher.fingerprint, "topk": topk, "seq_len": c.data.seq_len,
                "num_chunks": n, "rows_per_shard": ROWS_PER_SHARD, "shards": shards.close(),
                "tokenizer": identity["tokenizer"], "train_chunks": identity["train_chunks"]}
    if writer:
        storage.write_atomic(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


class ShardWriter:
    """Rows in chunk order -> npy shards of exactly ROWS_PER_SHARD rows each but the last,
    so that chunk i is row i % ROWS_PER_SHARD of shard i // ROWS_PER_SHARD whatever the
    batch size. Only the `writer` process writes; every process names the shards."""

    def __init__(self, out: epath.Path, writer: bool):
        self.out, self.writer = out, writer
        self.names: list[str] = []
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._rows = 0

    def add(self, ids: np.ndarray, logp: np.ndarray) -> None:
        self._pending.append((ids, logp))
        self._rows += len(ids)
        if self._rows >= ROWS_PER_SHARD:
            self._flush(final=False)

    def close(self) -> list[str]:
        """Writes the rest as the last shard -> the shards' names."""
        self._flush(final=True)
        return self.names

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        ids = np.concatenate([p[0] for p in self._pending])
        logp = np.concatenate([p[1] for p in self._pending])
        while len(ids) >= ROWS_PER_SHARD or (final and len(ids)):
            name = f"{len(self.names):05d}"
            self.names.append(name)
            if self.writer:
                for kind, arr in (("ids", ids[:ROWS_PER_SHARD]),
                                  ("logprobs", logp[:ROWS_PER_SHARD])):
                    with (self.out / f"{kind}-{name}.npy").open("wb") as f:
                        np.save(f, arr, allow_pickle=False)
            ids, logp = ids[ROWS_PER_SHARD:], logp[ROWS_PER_SHARD:]
        self._pending = [(ids, logp)] if len(ids) else []
        self._rows = len(ids)


class StoredTeacher:
    """The stored top-k of a folder `write` finished (its manifest). Local shards are
    memory-mapped; on Cloud Storage each row is one ranged read (no shard is fetched whole)."""

    def __init__(self, directory: str):
        self.directory = storage.path(directory)
        path = self.directory / MANIFEST
        fix = "write them with `python -m gopher_jax teacher logits --teacher DIR --config ...`"
        if not path.is_file():
            raise distill.TeacherError(
                f"{directory} holds no finished teacher logits ({MANIFEST} missing)", fix)
        self.manifest = storage.read_json(path, fix)
        missing = [k for k in _MANIFEST_KEYS if k not in self.manifest]
        if missing:
            raise distill.TeacherError(f"{path} lacks {', '.join(missing)}", fix)
        self.topk: int = self.manifest["topk"]
        self._remote = storage.is_remote(self.directory)
        self._open: dict[int, tuple[Any, Any]] = {}

    def _shard(self, index: int) -> tuple[Any, Any]:
        """(ids, logprobs) of a shard: memory maps, or (path, header) pairs when remote."""
        if index not in self._open:
            name = self.manifest["shards"][index]
            paths = [self.directory / f"{kind}-{name}.npy" for kind in ("ids", "logprobs")]
            self._open[index] = tuple(
                (p, _npy_header(p)) if self._remote
                else np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        return self._open[index]

    def _row(self, a: Any, row: int) -> np.ndarray:
        if not self._remote:
            return a[row]
        p, (offset, shape, dtype) = a
        size = math.prod(shape[1:]) * dtype.itemsize
        start = offset + row * size
        return np.frombuffer(storage.read_range(p, start, start + size),
                             dtype).reshape(shape[1:])

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, log-probs) [len(indices), seq_len, k] of those chunks."""
        per = self.manifest["rows_per_shard"]
        rows = [tuple(self._row(a, int(i) % per) for a in self._shard(int(i) // per))
                for i in indices]
        shape = (0, self.manifest["seq_len"], self.topk)
        if not rows:
            return np.zeros(shape, np.int32), np.zeros(shape, np.float32)
        return (np.stack([r[0] for r in rows]).astype(np.int32),
                np.stack([r[1] for r in rows]).astype(np.float32))


_MANIFEST_KEYS = ("teacher", "topk", "seq_len", "num_chunks", "rows_per_shard", "shards",
                  "tokenizer", "train_chunks")


def _npy_header(p: epath.Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(where the data starts, shape, dtype) of a C-ordered npy file, from its first bytes."""
    head = io.BytesIO(storage.read_range(p, 0, 4096))
    version = np.lib.format.read_magic(head)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(head)
    if fortran:
        raise distill.TeacherError(f"{p} is not a C-ordered array", "write the teacher "
                                   "logits again with `python -m gopher_jax teacher logits`")
    return head.tell(), shape, dtype


class TeacherBatches(rows_lib.RowBatches):
    """Training batches (pipeline.TrainData) with each row's stored top-k beside it."""

    def __init__(self, data: Any, store: StoredTeacher):
        self.data, self.store = data, store
        self.split, self.num_chunks, self.seed = data.split, data.num_chunks, data.seed
        self.batch_size, self.seq_len = data.batch_size, data.seq_len

    def local_rows(self, step: int, process_index: int = 0, process_count: int = 1,
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        rows = self.process_rows(rows, process_index, process_count)
        out = self.data.local_rows(step, rows=rows)
        out.update(zip(KEYS, self.store.read(self.data.global_indices(step, rows)), strict=True))
        return out

    def batch(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
        local = self.local_rows(step, rows=rows_lib.rows_for_devices(sharding, self.shape))
        extra = {k: local.pop(k) for k in KEYS}
        out = rows_lib.to_global(local, sharding, self.batch_size, self.seq_len)
        shape = (self.batch_size, self.seq_len, self.store.topk)
        out.update({k: jax.make_array_from_process_local_data(sharding, v, shape)
                    for k, v in extra.items()})
        return out

    def consumed(self, step: int) -> dict[str, float]:
        return self.data.consumed(step)


class StoredDistillation:
    """The objective of `distill --teacher_logits DIR` (see distill.Distillation): the KL
    against the stored top-k, renormalised over the k ids (model/distillation.py)."""

    def __init__(self, c: ml_collections.ConfigDict, store: StoredTeacher):
        self.c, self.store = c, store

    def identity(self, data_identity: dict[str, str]) -> dict[str, str]:
        m = self.store.manifest
        for key in ("tokenizer", "train_chunks"):
            if m[key] != data_identity.get(key):
                raise distill.TeacherError(
                    f"the teacher logits in {self.store.directory} were written for {key} "
                    f"{m[key]}, the student's data has {data_identity.get(key)}",
                    "write them for this config (`teacher logits`)")
        return {**data_identity, "teacher": f"{m['teacher']}/top{m['topk']}"}

    def batches(self, data: Any) -> TeacherBatches:
        return TeacherBatches(data, self.store)

    def make_step(self, c: ml_collections.ConfigDict, layout: Layout) -> Any:
        d, chunk = c.distill, c.model.loss_chunk

        def sums(graphdef: nnx.GraphDef, params: Any, batch: step_lib.Batch, extra: Any
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
            del extra
            inputs, seg, targets, weights = step_lib.split_batch(batch)
            student = nnx.merge(graphdef, params)
            x = student.hidden(inputs, seg)
            with jax.named_scope("distillation"):
                loss, nll, kl = distillation.topk_sums(
                    x, student.output_embedding(), targets, weights, batch["teacher_ids"],
                    batch["teacher_logprobs"], chunk, d.kl_weight, d.temperature)
            return loss, {"nll": nll, "weight": jnp.sum(weights), "kl": kl}

        return step_lib.make_train_step(c, layout, step_lib.Loss(sums=sums))
