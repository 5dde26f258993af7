"""What installing the package promises: every module of gopher_jax imports, and the exact
versions CI installs (constraints.txt) lie inside setup.cfg's ranges, which also admit a GPU
image's newer JAX."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys

from helpers import ROOT, cpu_env
from packaging.requirements import Requirement
from packaging.version import Version

_IMPORT_ALL = """
import importlib, json, pkgutil, gopher_jax
names = [m.name for m in pkgutil.walk_packages(gopher_jax.__path__, "gopher_jax.")]
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # report every module that fails, not only the first
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"modules": names, "failed": failed}))
"""


def test_every_module_imports():
    """A fresh interpreter imports each module of the package (walk_packages finds them
    all): catches a module that fails at import, e.g. on a name a new dependency version
    removed, which tests that never import it would not see."""
    p = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, env=cpu_env(1),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert "gopher_jax.model.gpu_attention" in report["modules"], report["modules"]
    assert len(report["modules"]) > 50
    assert report["failed"] == {}


def _install_requires() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [x for x in cfg["options"]["install_requires"].splitlines() if x.strip()]
    return {r.name: r for r in map(Requirement, lines)}


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = Version(spec.version)
    return pins


def test_constraints_pin_versions_inside_the_ranges():
    reqs, pins = _install_requires(), _constraints()
    assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"} <= set(pins)
    for name, version in pins.items():
        assert name in reqs, f"constraints.txt pins {name}, which setup.cfg does not require"
        assert reqs[name].specifier.contains(version), (name, str(reqs[name]), version)


def test_ranges_admit_a_gpu_images_newer_jax():
    reqs = _install_requires()
    for name in ("jax", "jaxlib"):
        assert reqs[name].specifier.contains("0.11.0"), reqs[name]
    for name in ("flax", "optax", "orbax-checkpoint"):
        assert not any(s.operator in ("==", "<", "<=", "~=") for s in reqs[name].specifier)
