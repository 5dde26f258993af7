"""Peak FLOP/s per device, for MFU: vendor numbers for accelerators, a measurement on CPU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per device as JAX enumerates devices (a v4/v5p megacore chip is one device).
PEAK_BF16 = {
    "TPU v2": 45e12 / 2,  # one device per core
    "TPU v3": 123e12 / 2,  # one device per core
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}
# HBM per device in bytes, for the AOT report (v2/v3: per TensorCore, half a chip).
HBM_BYTES = {
    "TPU v2": 8 * 2**30, "TPU v3": 16 * 2**30, "TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30,
    "TPU v5e": 16 * 2**30, "TPU v5p": 95 * 2**30, "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30, "TPU v6e": 32 * 2**30,
}


def lookup(table: dict[str, float], kind: str) -> float | None:
    """Longest table key that prefixes the device kind ('NVIDIA H100 80GB HBM3' -> H100)."""
    keys = [k for k in table if kind.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted n^3 matmul on the first device, best of `reps` (after compiling)."""
    dt = jnp.dtype(dtype)
    out_dt = jnp.float32
    a = jnp.ones((n, n), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=out_dt))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@functools.cache
def peak_flops_per_device(compute_dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number came from)."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        # MFU on accelerators is quoted against the bf16 peak, whatever the compute dtype.
        peak = lookup(PEAK_BF16, dev.device_kind)
        if peak is not None:
            return peak, f"{dev.device_kind} bf16 datasheet"
    # The CPU's devices share its cores: the measured matmul is the whole machine's peak.
    total = measure_matmul_peak(compute_dtype)
    return total / jax.local_device_count(), f"measured {total / 1e9:.1f} GFLOP/s matmul"
