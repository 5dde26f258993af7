"""Loss spikes: what counts as one, which data batches a run skips, and where it stands in
the data after skipping.

The data order is a pure function of (seed, data index): without skips training step s reads
data index s; with them, step s reads the s-th data index not skipped. A spike adds a range
of data indices to skip, none before the data the rewound-to checkpoint reads next, so the
steps before that checkpoint keep their batches. The guard's state (skip list, recent
losses, rewinds so far) is saved with each checkpoint, so a killed and resumed run reads
and skips the very same batches.

The policy follows PaLM (Chowdhery et al. 2022, section 5.1): on a spike, go back to a
checkpoint from before it and skip the batches around it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from typing import Any

import ml_collections


@dataclasses.dataclass
class Spike:
    """A loss that the guard refuses: `state_step` is the step the bad loss was computed at
    (its params are suspect), `data_index` the batch it read."""

    state_step: int
    data_index: int
    loss: float
    grad_norm: float
    median: float | None

    def describe(self) -> str:
        if not math.isfinite(self.loss) or not math.isfinite(self.grad_norm):
            return (f"non-finite loss {self.loss} (grad norm {self.grad_norm}) at step "
                    f"{self.state_step + 1}")
        return (f"loss spike {self.loss:.4g} (over {self.median:.4g}, the median of the recent "
                f"losses, times the spike factor) at step {self.state_step + 1}")


class SpikeGuard:
    """Judges each step's loss against the recent ones and keeps the skip list.

    A loss is a spike when it is not finite, or (policy "rewind" only) when it exceeds
    `factor` times the median of the last `window` losses (judged once `window` are known).
    """

    def __init__(self, t: ml_collections.ConfigDict, saved: dict[str, Any] | None = None):
        self.policy: str = t.spike_policy
        self.factor: float = float(t.spike_factor)
        self.window: int = int(t.spike_window)
        self.skip_batches: int = int(t.spike_skip_batches)
        self.max_rewinds: int = int(t.spike_max_rewinds)
        saved = saved or {}
        self.skips: list[list[int]] = [list(r) for r in saved.get("skips", [])]
        self.rewinds: int = int(saved.get("rewinds", 0))
        self.recent: collections.deque[float] = collections.deque(
            saved.get("recent", []), maxlen=self.window)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (JSON)."""
        return {"skips": [list(r) for r in self.skips], "rewinds": self.rewinds,
                "recent": list(self.recent)}

    def restart_window(self, saved: dict[str, Any] | None) -> None:
        """After a rewind: the recent losses are those of the checkpoint gone back to; the
        skip list and the rewind count keep growing."""
        self.recent = collections.deque((saved or {}).get("recent", []), maxlen=self.window)

    def judge(self, state_step: int, data_index: int, loss: float, grad_norm: float
              ) -> Spike | None:
        """None for a loss that is fine (then remembered as a recent one), else the Spike."""
        median = statistics.median(self.recent) if len(self.recent) == self.window else None
        spiking = (self.policy == "rewind" and median is not None
                   and loss > self.factor * median)
        if math.isfinite(loss) and math.isfinite(grad_norm) and not spiking:
            self.recent.append(loss)
            return None
        return Spike(state_step, data_index, loss, grad_norm, median)

    def can_rewind(self) -> bool:
        return self.policy == "rewind" and self.rewinds < self.max_rewinds

    def skip_around(self, spike: Spike, rewound_to: int) -> tuple[int, int]:
        """Adds the `skip_batches` data indices ending with the spike's batch (the batch
        whose update made the params bad is among them once skip_batches >= 2), none before
        what step `rewound_to` reads; returns the range [start, end)."""
        end = spike.data_index + 1
        start = max(self.index_of(rewound_to), end - self.skip_batches)
        self.skips = _merge([*self.skips, [start, end]])
        self.rewinds += 1
        return start, end

    def knows(self, row: dict[str, Any]) -> bool:
        """Whether a metrics row is a spike whose skip is in this guard's list (a resumed or
        rewound run keeps those rows; it meets the others again)."""
        if row.get("split") != "spike":
            return False
        start, end = row.get("skip_start"), row.get("skip_end")
        return any(a <= start and end <= b for a, b in self.skips)

    def index_of(self, step: int) -> int:
        """The data index step `step` reads: the step-th (from 0) index not skipped."""
        index = step
        for start, end in self.skips:  # sorted and disjoint
            if start <= index:
                index += end - start
        return index


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out
