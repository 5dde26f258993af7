"""JAX's distributed runtime from the environment, and process-aware helpers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")


def initialize_from_env() -> None:
    """Starts jax.distributed when a multi-process launch is detected.

    Explicit: GOPHER_COORDINATOR, GOPHER_NUM_PROCESSES, GOPHER_PROCESS_ID (launch/local.py
    sets them). Otherwise TPU VMs and SLURM are detected by jax.distributed.initialize().
    """
    if jax.distributed.is_initialized():
        return
    coord = os.environ.get("GOPHER_COORDINATOR")
    if coord:
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["GOPHER_NUM_PROCESSES"]),
            process_id=int(os.environ["GOPHER_PROCESS_ID"]),
            initialization_timeout=int(os.environ.get("GOPHER_INIT_TIMEOUT", "300")),
        )
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def run_on_process_zero_first(fn: Callable[[], T]) -> T:
    """Process 0 runs `fn` (e.g. preparing shared data) before the others do."""
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        out = fn()
        multihost_utils.sync_global_devices("gopher_jax:process_zero_first")
        return out
    multihost_utils.sync_global_devices("gopher_jax:process_zero_first")
    return fn()
