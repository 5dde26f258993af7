"""Which JAX platforms to start, decided before jax is imported.

With the `tpu` extra (libtpu) installed on a machine without a TPU, JAX's TPU plugin prints
start-up errors ("Failed to find host bounds", "unexpected worker hostname") on every
command. TPU VMs expose their chips as /dev/accel* (v2-v5p) or /dev/vfio/* (v5e, v6e); when
neither exists and the user has not chosen, the TPU backend is not started.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def has_tpu_devices() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def choose_platforms(env: dict[str, str] | None = None) -> str | None:
    """The JAX_PLATFORMS value to set, or None to leave JAX's own choice."""
    env = os.environ if env is None else env
    if env.get("JAX_PLATFORMS") or has_tpu_devices():
        return None
    if importlib.util.find_spec("libtpu") is None:
        return None  # nothing noisy to keep out
    cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    return "cuda,cpu" if cuda and os.path.exists("/dev/nvidiactl") else "cpu"


def configure() -> None:
    choice = choose_platforms()
    if choice is not None:
        os.environ["JAX_PLATFORMS"] = choice
