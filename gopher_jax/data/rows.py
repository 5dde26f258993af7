"""Which rows of a global [batch, seq_len + 1] batch a process (or a set of devices) holds,
and its local rows made into global jax.Arrays: what every kind of batches shares."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gopher_jax.errors import DataError


def rows_for_devices(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
                     devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """Sorted rows (dim 0) the given devices (default: this process's) hold under sharding."""
    if devices is None:
        index_map = sharding.addressable_devices_indices_map(shape)
    else:
        full = sharding.devices_indices_map(shape)
        index_map = {dev: full[dev] for dev in devices}
    rows: set[int] = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def _batch_sharding_1d(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of a [batch] array that splits rows like `sharding` does."""
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"batches need a NamedSharding over a mesh, got {type(sharding)}")
    spec = sharding.spec
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if len(spec) else None))


def to_global(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
              batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    s1 = _batch_sharding_1d(sharding)
    out = {}
    for key, value in local.items():
        if value.ndim == 2:
            out[key] = jax.make_array_from_process_local_data(
                sharding, value, (batch_size, seq_len + 1))
        else:
            out[key] = jax.make_array_from_process_local_data(s1, value, (batch_size,))
    return out


def contiguous_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    if batch_size % process_count:
        raise DataError(f"train.batch_size {batch_size} is not divisible by {process_count} "
                        "processes", "make the batch a multiple of the process count")
    per = batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


class RowBatches:
    """What every kind of training batches shares (pipeline.TrainData, mixture.MixtureData):
    the global batch's shape, the rows a caller may ask for, and the global batch made of the
    rows this process's devices hold. Subclasses set batch_size and seq_len and read rows in
    `local_rows`."""

    batch_size: int
    seq_len: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch_size, self.seq_len + 1)

    def checked_rows(self, rows: Sequence[int] | None) -> list[int]:
        """`rows` (default: all of the batch), refused outside [0, batch_size)."""
        if rows is None:
            return list(range(self.batch_size))
        if len(rows) and not 0 <= min(rows) <= max(rows) < self.batch_size:
            raise IndexError(f"rows must lie in [0, {self.batch_size}), got {list(rows)}")
        return [int(r) for r in rows]

    def process_rows(self, rows: Sequence[int] | None, process_index: int,
                     process_count: int) -> Sequence[int]:
        """`rows`, or by default process `process_index`'s contiguous block of `process_count`."""
        return contiguous_rows(self.batch_size, process_index, process_count) \
            if rows is None else rows

    def local_rows(self, step: int, process_index: int = 0, process_count: int = 1,
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
        """The global batch at `step` as jax.Arrays sharded by `sharding` (batch on dim 0);
        this process reads only the rows its devices hold."""
        mine = rows_for_devices(sharding, self.shape)
        return to_global(self.local_rows(step, rows=mine), sharding, self.batch_size,
                         self.seq_len)
