"""The metadata saved beside each checkpoint step (<step>/meta/metadata, JSON): what a resume,
`checkpoint info`, evaluation and the Hugging Face export read back."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from gopher_jax import storage

# The key of an imported checkpoint's source in the JSON (hf/importer.py writes it).
HF_IMPORT_KEY = "hf_import"


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """One step's metadata. `data`: content fingerprints of the tokenizer and the training
    chunks (data.data_identity), checked on resume; `data_step`: the next data index (the
    step unless batches were skipped; the data order is a pure function of (seed, data
    index)); `spikes`: the spike guard's skip list and recent losses; `goodput`: the run's
    time totals (train/goodput.py); `hf_import`: for a checkpoint imported from Hugging Face,
    {"from", "step", "eval"} of the weights it started from."""

    step: int
    config: dict[str, Any]
    layout: str  # "scanned" or "unscanned"
    mesh: dict[str, int]
    rules: str
    process_count: int
    device_count: int
    saved_at: float | None = None  # time.time() of the save
    data: dict[str, str] = dataclasses.field(default_factory=dict)
    data_step: int = 0
    spikes: dict[str, Any] = dataclasses.field(default_factory=dict)
    goodput: dict[str, float] = dataclasses.field(default_factory=dict)
    hf_import: dict[str, Any] | None = None

    # The file's key order (and the keys a checkpoint of any version has).
    _ORDER = ("step", "saved_at", "data", "data_step", "spikes", "goodput", "config", "layout",
              "mesh", "rules", "process_count", "device_count")

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._ORDER}
        if self.hf_import is not None:
            out[HF_IMPORT_KEY] = self.hf_import
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointMeta:
        known = {f.name for f in dataclasses.fields(cls)} - {"hf_import"}
        return cls(**{"data_step": d["step"]} | {k: v for k, v in d.items() if k in known},
                   hf_import=d.get(HF_IMPORT_KEY))


def meta_for(c: ml_collections.ConfigDict, step: int, mesh: jax.sharding.Mesh,
             data: dict[str, str] | None = None, position: int | None = None,
             spikes: dict[str, Any] | None = None, goodput: dict[str, float] | None = None
             ) -> CheckpointMeta:
    """The metadata of a save at `step` of config `c` from `mesh` (see CheckpointMeta;
    `position`: the data index, default the step)."""
    return CheckpointMeta(
        step=step, saved_at=time.time(), data=data or {},
        data_step=step if position is None else position, spikes=spikes or {},
        goodput=goodput or {}, config=json.loads(c.to_json()),
        layout="scanned" if c.model.scan_layers else "unscanned",
        mesh={k: int(v) for k, v in mesh.shape.items()}, rules=c.mesh.rules,
        process_count=jax.process_count(), device_count=jax.device_count())


def read_meta(directory: str | os.PathLike, step: int) -> CheckpointMeta:
    """The metadata of checkpoint `step` under `directory` (<workdir>/checkpoints)."""
    return CheckpointMeta.from_json(json.loads(meta_path(storage.path(directory) / str(step))
                                               .read_text()))


def meta_path(step_dir: epath.Path) -> epath.Path:
    """Where a step directory keeps its metadata."""
    return step_dir / "meta" / "metadata"
