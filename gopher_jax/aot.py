"""Ahead-of-time compilation of the real train step for a TPU topology, on any machine.

    python -m gopher_jax aot --config experiments/gopher_280b.py --topology v5p:16x16x16

needs libtpu (`pip install -e '.[tpu]'`); JAX stays on CPU. The topology's devices come
from `jax.experimental.topologies.get_topology_desc`, the mesh and state shardings from the
same code that trains (parallel/mesh.py, train/state.py, train/step.py), and the compiled
executable reports per-device memory and FLOPs. Exits non-zero when the step does not fit in
the device's HBM.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from gopher_jax import hardware
from gopher_jax.errors import UsageError
from gopher_jax.model import sizes
from gopher_jax.model.gopher import compute_dtype


class AotError(UsageError, RuntimeError):
    pass


class DoesNotFit(AotError):
    """The compiler rejected the program: it needs more HBM than a device has."""

    exit_code = 1


def parse_topology(spec: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:16x16x16' -> ('v5p', (16, 16, 16)), checked against the generation's torus."""
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", spec.strip())
    if not m or m.group(1) not in hardware.TPU_GENERATIONS:
        raise AotError(f"--topology={spec!r}: expected GEN:AxB[xC]",
                       f"GEN one of {sorted(hardware.TPU_GENERATIONS)}, e.g. v5p:16x16x16 or "
                       "v3:32x32")
    gen, dims = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    ndim = hardware.TPU_GENERATIONS[gen].torus_dims
    if len(dims) != ndim:
        raise AotError(f"--topology={spec!r}: {gen} chips form a {ndim}-D torus",
                       f"give {ndim} dimensions")
    return gen, dims


def topology_devices(spec: str, num_slices: int = 1) -> list[jax.Device]:
    """The devices of `num_slices` slices of `spec`, without any TPU attached."""
    from jax.experimental import topologies

    gen, dims = parse_topology(spec)
    quiet_libtpu()
    g = hardware.TPU_GENERATIONS[gen]
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{g.name}:{'x'.join(map(str, dims))}",
            chip_config_name=g.chip_config, chips_per_host_bounds=(2, 2, 1),
            num_slices=num_slices, wrap=g.wraparound(dims))
    except RuntimeError as e:
        raise AotError(f"libtpu could not describe topology {spec} x {num_slices} slice(s): "
                       f"{e}") from e
    return list(topo.devices)


def libtpu_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass
class Report:
    config: str
    topology: str
    num_slices: int
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    rules: str
    microbatches: int
    remat_policy: str
    params: int
    tokens_per_step: int
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    total_bytes: int
    hbm_bytes: int | None
    fits: bool
    compiler_flops_per_device: float
    formula_flops_per_step: float
    formula_flops_per_device: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def for_platform(c: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """A copy of `c` with model.dtype 'auto' resolved for `platform` (bf16 on TPU)."""
    c = copy.deepcopy(c)
    with c.unlocked():
        c.model.dtype = str(jnp.dtype(compute_dtype(c.model.dtype, platform)))
    return c


def compile_train_step(c: ml_collections.ConfigDict, devices: list[jax.Device],
                       topology: str = "", num_slices: int = 1) -> tuple[Report, Any]:
    """Lowers and compiles make_train_step's function for `devices`; returns the report and
    the compiled executable."""
    from gopher_jax.layout import Layout
    from gopher_jax.parallel import mesh as mesh_lib
    from gopher_jax.train import step as step_lib

    c = for_platform(c, devices[0].platform)
    mesh = mesh_lib.make_mesh(c, devices)  # validates the config against the device count
    # Built outside the mesh context: optax's tree_map_params runs a (CPU) init eagerly.
    layout = Layout.build(c, mesh)
    step_fn = step_lib.make_train_step(c, layout)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step_fn.lower(layout.state, layout.batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            # The TPU compiler itself refuses programs that exceed the chip's HBM.
            if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
                raise DoesNotFit(str(e).strip().splitlines()[0][:600]) from e
            raise
    compile_s = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    n = len(devices)
    kind = devices[0].device_kind
    hbm = hardware.hbm_bytes(kind)
    # Donated state is both argument and output; count it once.
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    tokens = c.train.batch_size * c.data.seq_len
    formula = sizes.flops_per_token(c.model, c.data.seq_len)["train"] * tokens
    notes = []
    if c.model.scan_layers or c.train.microbatches > 1:
        notes.append("XLA's cost analysis counts the body of a loop once: the compiler FLOPs "
                     f"cover one of {c.model.num_layers} scanned layers"
                     + (f" and one of {c.train.microbatches} microbatches"
                        if c.train.microbatches > 1 else ""))
    if c.model.remat_policy != "none":
        notes.append(f"remat ({c.model.remat_policy}) recomputes the forward pass in the "
                     "backward pass; the formula counts forward + backward only")
    report = Report(
        config=c.name, topology=topology, num_slices=num_slices, device_kind=kind,
        num_devices=n, mesh=dict(mesh.shape), rules=c.mesh.rules,
        microbatches=c.train.microbatches, remat_policy=c.model.remat_policy,
        params=sizes.param_counts(c.model)["total"], tokens_per_step=tokens,
        compile_s=compile_s, argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
        total_bytes=total, hbm_bytes=hbm, fits=hbm is not None and total <= hbm,
        compiler_flops_per_device=float(cost.get("flops", float("nan"))),
        formula_flops_per_step=formula, formula_flops_per_device=formula / n, notes=notes)
    return report, compiled


def aot_compile(c: ml_collections.ConfigDict, topology: str, num_slices: int = 1) -> Report:
    if not libtpu_available():
        raise AotError("libtpu is not installed", "pip install -e '.[tpu]' (jax[tpu]==0.10.2 "
                       "pulls the matching libtpu 0.0.42.*)")
    quiet_libtpu()
    c = copy.deepcopy(c)  # the caller's config is left as it was
    with c.unlocked():
        c.mesh.num_slices = num_slices
        if num_slices > 1 and c.mesh.data == 1:
            # Data parallel across slices, as Gopher ran across pods.
            c.mesh.data = num_slices
    devices = topology_devices(topology, num_slices)
    report, _ = compile_train_step(c, devices, topology, num_slices)
    return report


ADVICE = ("  try: more devices, a larger mesh.tensor or fsdp, more train.microbatches, or "
           "model.remat_policy=nothing_saveable")


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def format_report(r: Report) -> str:
    hbm = _gib(r.hbm_bytes) if r.hbm_bytes else "unknown"
    lines = [
        f"{r.config} on {r.topology}"
        + (f" x {r.num_slices} slices" if r.num_slices > 1 else "")
        + f": {r.num_devices:,} devices ({r.device_kind}), mesh {r.mesh}, rules {r.rules}, "
          f"microbatches {r.microbatches}, remat {r.remat_policy}",
        f"  params {r.params / 1e9:,.3f} B, {r.tokens_per_step:,} tokens per step; "
        f"compiled in {r.compile_s:.1f} s",
        "  per-device memory:",
        f"    arguments   {_gib(r.argument_bytes)}",
        f"    outputs     {_gib(r.output_bytes)} ({_gib(r.alias_bytes)} aliased to donated "
        "arguments)",
        f"    temporaries {_gib(r.temp_bytes)}",
        f"    code        {_gib(r.code_bytes)}",
        f"    total       {_gib(r.total_bytes)} of {hbm} HBM "
        f"({100 * r.total_bytes / r.hbm_bytes:.0f}%)" if r.hbm_bytes else "",
        f"  FLOPs per step: formula {r.formula_flops_per_step:.4g} "
        f"({r.formula_flops_per_device:.4g} per device); compiler {r.compiler_flops_per_device:.4g}"
        " per device",
    ]
    lines += [f"  note: {n}" for n in r.notes]
    lines.append("  FITS" if r.fits else f"  DOES NOT FIT\n{ADVICE}")
    return "\n".join(x for x in lines if x)


def quiet_libtpu() -> None:
    """No TPU is attached: skip libtpu's TPU VM metadata lookups, and its single-user lock
    (compiling only, several AOT runs may share a machine)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

