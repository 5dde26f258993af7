"""The device mesh ('data', 'fsdp', 'tensor') from config, optionally spanning slices."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from gopher_jax import config as config_lib
from gopher_jax.parallel.rules import MESH_AXES


def make_mesh(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Validates `c` against the devices, then builds the mesh with Auto axes.

    With mesh.num_slices > 1 the data axis is laid out slice-major, so only data-parallel
    gradient reductions cross the slower links between slices (as Gopher ran across pods).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = config_lib.validate(c, len(devices))
    slices = c.mesh.num_slices
    if slices > 1:
        ici = (shape[0] // slices, shape[1], shape[2])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    else:
        try:  # topology-aware order on TPU/GPU
            arr = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Odd shapes the helper cannot tile; process-major order keeps hosts contiguous.
            devices.sort(key=lambda d: (d.process_index, d.id))
            arr = np.array(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
