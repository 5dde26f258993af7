"""What every benchmark script records beside its numbers, and how it writes them."""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The short commit the numbers were measured at (README tables cite it)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


def write_results(path: str | pathlib.Path, out: dict[str, Any], indent: int = 1) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=indent) + "\n")
    print(f"wrote {path}")
