"""The device mesh ('data', 'fsdp', 'tensor') from config, optionally spanning slices, and the
checks that a config can run on a number of devices."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from gopher_jax import config as config_lib
from gopher_jax import names
from gopher_jax.errors import ConfigError
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.parallel.rules import MESH_AXES


def make_mesh(c: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Validates `c` against the devices, then builds the mesh with Auto axes.

    With mesh.num_slices > 1 the data axis is laid out slice-major, so only data-parallel
    gradient reductions cross the slower links between slices (as Gopher ran across pods).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = validate(c, len(devices))
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


def mesh_shape(ms: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 resolved to the remaining devices."""
    dims = [ms.data, ms.fsdp, ms.tensor]
    if dims.count(-1) > 1:
        raise ConfigError(f"mesh {dict(data=ms.data, fsdp=ms.fsdp, tensor=ms.tensor)} has more "
                          "than one axis -1", "set at most one axis to -1 (the remaining "
                          "devices)")
    known = math.prod(d for d in dims if d != -1)
    if any(d == 0 or d < -1 for d in dims):
        raise ConfigError(f"mesh axes {dims}", "give each axis a positive size or -1")
    if -1 in dims:
        if num_devices % known:
            raise ConfigError(f"{num_devices} devices cannot be split into mesh axes {dims}: "
                              f"{num_devices} is not divisible by {known}",
                              "change the other axes")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ConfigError(f"mesh data*fsdp*tensor = {dims[0]}*{dims[1]}*{dims[2]} = "
                          f"{math.prod(dims)} but there are {num_devices} devices",
                          "set one axis to -1 to take the rest")
    return tuple(dims)


def validate(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Reject a config that cannot run on `num_devices`, before anything compiles.

    Returns the resolved (data, fsdp, tensor) mesh shape.
    """
    config_lib.check(c)
    m, t, ms = c.model, c.train, c.mesh
    if ms.rules not in names.RULE_SETS:
        raise ConfigError(f"unknown rule set mesh.rules={ms.rules!r}",
                          f"choose one of {names.RULE_SETS}")
    data, fsdp, tensor = mesh_shape(ms, num_devices)
    rules = rules_lib.get_rules(ms.rules)
    axis_size = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for logical in ("fsdp", "tensor"):
        used = rules_lib.mesh_axes_used(rules)
        if axis_size[logical] > 1 and logical not in used:
            raise ConfigError(f"rule set {ms.rules!r} does not use the {logical} axis, but "
                              f"mesh.{logical}={axis_size[logical]}",
                              f"set mesh.{logical}=1 or pick rules that shard over it")

    def size(logical: str) -> int:
        return math.prod(axis_size[a] for a in rules_lib.mesh_axes_for(rules, logical))

    checks = [
        ("heads", "model.num_heads", m.num_heads),
        ("mlp", "model.d_model * mlp_ratio", config_lib.d_ff(m)),
        ("vocab", "model.vocab_size", m.vocab_size),
        ("embed", "model.d_model", m.d_model),
    ]
    for logical, what, value in checks:
        n = size(logical)
        if value % n:
            axes = "*".join(f"{a}={axis_size[a]}" for a in rules_lib.mesh_axes_for(rules, logical))
            raise ConfigError(f"{what} = {value} is not divisible by the mesh axes that rule set "
                              f"{ms.rules!r} shards '{logical}' over ({axes} = {n})",
                              "change the mesh or the rule set")
    n_batch = size("batch")
    micro = t.batch_size // t.microbatches
    if micro % n_batch:
        raise ConfigError(f"the per-microbatch batch {micro} (train.batch_size {t.batch_size} / "
                          f"microbatches {t.microbatches}) is not divisible by data*fsdp = "
                          f"{data}*{fsdp} = {n_batch}", f"make it a multiple of {n_batch}")
    if ms.num_slices > 1 and data % ms.num_slices:
        raise ConfigError(f"mesh.data = {data} is not a multiple of mesh.num_slices = "
                          f"{ms.num_slices} (data parallelism spans slices)",
                          "change mesh.data or mesh.num_slices")
    return data, fsdp, tensor
