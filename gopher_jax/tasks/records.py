"""The typed results of scoring tasks: one task's score (grading.score, corpora.score), and
the results of a run (<workdir>/tasks.json, written as `TaskResults.to_json` gives it)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """One task scored: its metrics, and either one prediction per example (grading.score)
    or, for a language-modelling corpus, the documents scored and their counts
    ({documents, bytes, text_bytes, tokens, loss}; corpora.score)."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    n: int | None = None
    counts: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One task's entry in tasks.json: its group and kind, the examples (or documents)
    scored, chance, the main metric (the task's, else its kind's) and the metrics."""

    group: str
    kind: str
    n: int
    chance: float
    main_metric: str
    metrics: dict[str, float]
    counts: dict[str, Any] | None = None

    @property
    def main(self) -> float:
        return self.metrics[self.main_metric]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k != "counts"}


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """A group's mean of its tasks' main metrics, over `tasks` tasks."""

    mean: float
    tasks: int


@dataclasses.dataclass(frozen=True)
class TaskResults:
    """tasks.json: the checkpoint's step (None for a param tree), each task's result and
    each group's."""

    step: int | None
    tasks: dict[str, TaskResult]
    groups: dict[str, GroupResult]

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "tasks": {n: t.to_json() for n, t in self.tasks.items()},
                "groups": {g: dataclasses.asdict(v) for g, v in self.groups.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskResults:
        return cls(step=d["step"],
                   tasks={n: TaskResult(**t) for n, t in d["tasks"].items()},
                   groups={g: GroupResult(**v) for g, v in d["groups"].items()})
