"""One array (or one layer of a stacked array) at a time from an Orbax checkpoint step.

The arrays are opened with TensorStore through Orbax's own read spec (the OCDBT/zarr layout
it wrote, whichever processes wrote it) and read one at a time, so nothing holds the whole
model. Nothing here builds a mesh or touches a device.
"""

from __future__ import annotations

import json
import os

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
        # One chunk decoded at a time: a layer of a scanned array is a slice of chunks that
        # hold every layer, so the peak is one stored chunk plus the slice, not the array
        # (benchmarks/hf_export.py).
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

    def read(self, path: tuple[str, ...], layer: int | None = None) -> np.ndarray:
        """params/<path> (e.g. ("blocks", "attn", "wq")), or its `layer`-th entry along the
        leading axis."""
        arr = self._open(".".join(("params", *path)))
        if layer is not None:
            arr = arr[layer]
        return np.asarray(arr.read().result())

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._open(".".join(("params", *path))).shape)
