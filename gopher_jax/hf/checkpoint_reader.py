"""One array, or a run of layers of a stacked array, at a time from an Orbax checkpoint step.

The arrays are opened with TensorStore through Orbax's own read spec (the OCDBT/zarr layout
it wrote, whichever processes wrote it) and read one at a time, so nothing holds the whole
model. Nothing here builds a mesh or touches a device.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import storage
from gopher_jax import workdir as workdir_lib


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The complete steps under <workdir>/checkpoints (empty when there is none)."""
    directory = storage.path(workdir) / workdir_lib.CHECKPOINTS
    if not directory.is_dir():
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


class StepReader:
    """The train state of one checkpoint step, read array by array."""

    def __init__(self, workdir: str | os.PathLike, step: int):
        self.directory = storage.path(workdir) / workdir_lib.CHECKPOINTS
        self.step = step
        self.meta: ckpt_lib.CheckpointMeta = ckpt_lib.read_meta(self.directory, step)
        self.state_dir = self.directory / str(step) / "state"
        metadata = json.loads((self.state_dir / "_METADATA").read_text())
        self._use_zarr3 = bool(metadata.get("use_zarr3", False))
        # One chunk decoded at a time, straight into the array read (benchmarks/hf_export.py).
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=True,
                                                         data_copy_concurrency_limit=1)
        self._opened: dict[str, ts.TensorStore] = {}

    def _open(self, name: str) -> ts.TensorStore:
        if name in self._opened:  # the same stacked array, for its next layer
            return self._opened[name]
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(self.state_dir),
                                           is_ocdbt_checkpoint=True,
                                           use_zarr3=self._use_zarr3,
                                           ts_context=self._context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True)
        store = ts.open(spec, context=self._context, open=True, read=True).result()
        self._opened = {name: store}  # one handle kept: it holds no data once read
        return store

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        """params/<path>, e.g. ("blocks", "0", "attn", "wq")."""
        return _read_by_chunks(self._open(".".join(("params", *path))))

    def layer_blocks(self, path: tuple[str, ...]) -> Iterator[tuple[int, np.ndarray]]:
        """(first layer, [n, ...] array) for consecutive runs of the leading axis of a stacked
        array, each run the layers its stored chunks span, so that every chunk is decoded
        once. Orbax chunks by shard and the layers axis is seldom sharded: then the one run
        is the whole array. (Reading layer by layer would decode every chunk once per layer.)"""
        arr = self._open(".".join(("params", *path)))
        n, per_chunk = arr.shape[0], max(1, arr.chunk_layout.read_chunk.shape[0])
        for start in range(0, n, per_chunk):
            yield start, _read_by_chunks(arr[start:start + per_chunk])

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._open(".".join(("params", *path))).shape)


def _read_by_chunks(arr: ts.TensorStore) -> np.ndarray:
    """`arr` read one stored chunk after the other into one array. A single read of the
    whole would fetch every chunk's stored bytes at once (the file I/O runs up to 128 reads
    concurrently) and hold them beside the result: about twice the array at the peak."""
    out = np.empty(arr.shape, arr.dtype.numpy_dtype)
    lo, hi = arr.domain.inclusive_min, arr.domain.exclusive_max
    layout = arr.chunk_layout
    size = [k or h - m for k, m, h in zip(layout.read_chunk.shape, lo, hi, strict=True)]
    corners = [range(m - (m - o) % k, h, k)
               for m, h, k, o in zip(lo, hi, size, layout.grid_origin, strict=True)]
    for corner in itertools.product(*corners):  # coordinates of arr's domain
        box = tuple(slice(max(c, m), min(c + k, h))
                    for c, k, m, h in zip(corner, size, lo, hi, strict=True))
        out[tuple(slice(b.start - m, b.stop - m) for b, m in zip(box, lo, strict=True))] = \
            arr[box].read().result()
    return out
