"""What the code knows about accelerators: one table of TPU generations (for AOT topologies,
the TPU VM and GKE launchers, HBM and MFU) and the bf16 peaks of GPUs; a measured peak on CPU.

Importing it does not import jax: the launchers read the table on machines without it.
"""

from __future__ import annotations

import dataclasses
import time

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation. Per-device numbers follow JAX's devices: one per chip with megacore
    (v4, v5p) and on single-core chips (v5e, v6e), one per TensorCore on v2/v3."""

    name: str  # as libtpu, --topology (v5p:4x4x4) and the GKE launcher's --accelerator name it
    device_kinds: tuple[str, ...]  # prefixes of jax's Device.device_kind
    chip_config: str  # libtpu chip config: 'megacore' or 'default'
    torus_dims: int  # 2 or 3
    pod_side: int | None  # chips along each axis of a full 2-D pod; None for 3-D tori
    devices_per_chip: int
    peak_bf16_per_chip: float  # dense bf16 FLOP/s
    hbm_per_chip: int  # bytes
    tpu_vm_type: str  # gcloud accelerator-type prefix: v5litepod-16
    tpu_vm_runtime: str  # default runtime image (gcloud compute tpus versions list)
    gke_accelerator: str | None  # GKE node label; None: no GKE TPU node pool
    chips_per_host: int
    # Mosaic lowers the strided roll that model/flash_attention.py lines distances up with
    # only on v5 and later ("only supported in TPU v5+", libtpu 0.0.42).
    flash_attention: bool = False

    @property
    def peak_bf16_per_device(self) -> float:
        return self.peak_bf16_per_chip / self.devices_per_chip

    @property
    def hbm_per_device(self) -> int:
        return self.hbm_per_chip // self.devices_per_chip

    def wraparound(self, dims: tuple[int, ...]) -> tuple[bool, bool, bool]:
        """Which axes of a slice of `dims` chips have wraparound links: full pods of 2-D
        generations are tori, smaller slices are meshes; 3-D slices wrap along axes of 4+."""
        if self.torus_dims == 3:
            return tuple(d >= 4 for d in dims)
        return (*(d == self.pod_side for d in dims), False)


TPU_GENERATIONS: dict[str, TpuGeneration] = {g.name: g for g in (
    TpuGeneration("v2", ("TPU v2",), "default", 2, 16, 2, 45e12, 16 * GIB,
                  "v2", "tpu-ubuntu2204-base", None, 4),
    TpuGeneration("v3", ("TPU v3",), "default", 2, 32, 2, 123e12, 32 * GIB,
                  "v3", "tpu-ubuntu2204-base", None, 4),
    TpuGeneration("v4", ("TPU v4",), "megacore", 3, None, 1, 275e12, 32 * GIB,
                  "v4", "tpu-ubuntu2204-base", "tpu-v4-podslice", 4),
    TpuGeneration("v5e", ("TPU v5 lite", "TPU v5e"), "default", 2, 16, 1, 197e12, 16 * GIB,
                  "v5litepod", "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice", 4, True),
    TpuGeneration("v5p", ("TPU v5p", "TPU v5"), "megacore", 3, None, 1, 459e12, 95 * GIB,
                  "v5p", "v2-alpha-tpuv5", "tpu-v5p-slice", 4, True),
    TpuGeneration("v6e", ("TPU v6 lite", "TPU v6e"), "default", 2, 16, 1, 918e12, 32 * GIB,
                  "v6e", "v2-alpha-tpuv6e", "tpu-v6e-slice", 4, True),
)}

# Dense bf16 peak per GPU.
GPU_PEAK_BF16 = {
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}


# GPUs on which model/gpu_attention.py (model.attention_impl=pallas_gpu) has been run and
# found equal to XLA attention (fp32 2e-5, bf16 3e-2 of max |value|, outputs and gradients)
# and faster than it in the training step: device-kind prefix -> the record (GPU name,
# commit, tokens/s of both paths at T=2,048 and 8,192; benchmarks/gpu_check.sh writes them).
# attention_impl=auto picks the kernel on a GPU only when its kind is here; elsewhere it is
# opt-in. The H200 run: benchmarks/results/gpu_check_h200/ (its 512-position attention alone
# is slower than XLA's, 5.6 vs 3.8 ms; from 1,024 on faster).
GPU_ATTENTION_KERNEL_RUNS: dict[str, str] = {
    "NVIDIA H200": "NVIDIA H200, 56ba379, jax 0.11.2: GPU tests equal (fp32 2e-5, bf16 3e-2); "
                   "bf16 attention fwd+bwd, 12 heads of 128, kernel vs XLA tokens/s: T=2,048 "
                   "1.33M vs 0.74M, T=8,192 389k vs 188k; train step T=2,048 gopher_417m 73.5k "
                   "vs 39.4k tokens/s, gopher_44m 161k vs 94k",
}


def _longest_prefix(table: dict[str, object], kind: str) -> object | None:
    keys = [k for k in table if kind.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def tpu_generation(device_kind: str) -> TpuGeneration | None:
    """The generation of a jax device kind ('TPU v5 lite' -> v5e), or None."""
    kinds = {k: g for g in TPU_GENERATIONS.values() for k in g.device_kinds}
    return _longest_prefix(kinds, device_kind)


def peak_bf16(device_kind: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of one device ('NVIDIA H100 80GB HBM3' -> H100's)."""
    gen = tpu_generation(device_kind)
    return gen.peak_bf16_per_device if gen else _longest_prefix(GPU_PEAK_BF16, device_kind)


def gpu_attention_kernel_runs(device_kind: str) -> bool:
    """Whether `GPU_ATTENTION_KERNEL_RUNS` records a correct and faster run on this GPU."""
    return _longest_prefix(GPU_ATTENTION_KERNEL_RUNS, device_kind) is not None


def hbm_bytes(device_kind: str) -> int | None:
    """HBM of one TPU device in bytes (v2/v3: per TensorCore, half a chip), or None."""
    gen = tpu_generation(device_kind)
    return gen.hbm_per_device if gen else None


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted n^3 matmul on the first device, best of `reps` (after compiling)."""
    import jax
    import jax.numpy as jnp

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


class Peak:
    """Peak FLOP/s of one device, the denominator of MFU.

    Accelerators: the bf16 datasheet peak. CPU: no datasheet, so the best rate of a jitted
    matmul measured so far; one timing taken while other work shares the machine undercuts
    the peak and inflates MFU (it once printed 101%), so the start-up measurement takes the
    best of many timings, and a model rate near the peak triggers a new measurement. MFU is
    None (unknown) when the model still outruns every measured peak.
    """

    # A CPU model rate above this share of the measured peak gets the peak measured again.
    RECHECK_ABOVE = 0.8

    def __init__(self, compute_dtype: str = "float32"):
        import jax

        self.dtype = compute_dtype
        dev = jax.devices()[0]
        # MFU on accelerators is quoted against the bf16 peak, whatever the compute dtype.
        datasheet = peak_bf16(dev.device_kind) if dev.platform != "cpu" else None
        self.measured = datasheet is None
        if datasheet is not None:
            self.per_device, self.source = datasheet, f"{dev.device_kind} bf16 datasheet"
        else:
            self.per_device = 0.0
            self.remeasure(reps=10)

    def remeasure(self, reps: int = 5) -> None:
        import jax

        # The CPU's devices share its cores: the matmul measures the whole machine.
        total = measure_matmul_peak(self.dtype, reps=reps) / jax.local_device_count()
        self.per_device = max(self.per_device, total)
        machine = self.per_device * jax.local_device_count()
        self.source = f"best measured matmul {machine / 1e9:.1f} GFLOP/s"

    def mfu(self, flops_per_s_per_device: float) -> float | None:
        if self.measured and flops_per_s_per_device > self.RECHECK_ABOVE * self.per_device:
            self.remeasure()
        if flops_per_s_per_device > self.per_device:
            return None
        return flops_per_s_per_device / self.per_device
