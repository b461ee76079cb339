"""Which checkpoints of a run to keep: the newest K and the best B by a metric.

One policy, used in two places: by training after every checkpoint (through
the session, so orphans a killed driver left behind are judged too) and by
`raylab ckpt clean` after the fact, across runs (Determined-style).

    keep = newest K valid  +  best B valid by `metric`  +  the newest valid one, always

Ray's `CheckpointConfig` can express only one of "newest K" or "best K by a
score", and only over checkpoints its own registry knows, so raylab runs Ray
with `num_to_keep=None` and applies this policy itself.

Invalid folders (interrupted or corrupted saves) never count as kept: one older
than the newest valid checkpoint is deleted (nothing can resume from it), one
newer is left alone (it may be a save still being written, and a person should
see it in `raylab ckpt list`). A folder whose position is unknown is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pyarrow.fs as pafs

from raylab.checkpoint_store import CheckpointRecord, delete_checkpoint, order_key
from raylab.config import ConfigError, TrainConfig, metric_mode


@dataclass(frozen=True)
class RetentionPolicy:
    keep_latest: int | None  # None: keep every checkpoint
    keep_best: int = 0
    metric: str | None = None
    mode: Literal["min", "max"] | None = None  # None: from the metric's name (loss -> min)

    def __post_init__(self) -> None:
        if self.keep_latest is not None and self.keep_latest < 0:
            raise ConfigError(f"keep-latest must be 0 or more (got {self.keep_latest}).")
        if self.keep_best < 0:
            raise ConfigError(f"keep-best must be 0 or more (got {self.keep_best}).")
        if self.keep_best and not self.metric:
            raise ConfigError(f"keeping the best {self.keep_best} checkpoint(s) needs a metric to rank them by (e.g. val_loss).")
        if self.mode not in (None, "min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max' (got {self.mode!r}).")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "RetentionPolicy":
        return cls(cfg.keep_checkpoints, getattr(cfg, "keep_best_checkpoints", 0),
                   getattr(cfg, "checkpoint_metric", None), getattr(cfg, "checkpoint_mode", None))

    @property
    def better(self) -> Literal["min", "max"]:
        return self.mode or (metric_mode(self.metric) if self.metric else "min")

    def describe(self) -> str:
        if self.keep_latest is None:
            return "keep every checkpoint"
        text = f"keep the newest {self.keep_latest}"
        if self.keep_best:
            text += f" and the best {self.keep_best} by {self.metric} ({self.better})"
        return text


@dataclass
class RetentionPlan:
    keep: list[tuple[CheckpointRecord, str]] = field(default_factory=list)
    delete: list[tuple[CheckpointRecord, str]] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(r.size_bytes for r, _ in self.delete)


def _score(record: CheckpointRecord, metric: str) -> float | None:
    value = record.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def plan_retention(records: list[CheckpointRecord], policy: RetentionPolicy) -> RetentionPlan:
    """Split a run's checkpoints into kept and deleted, each with the reason."""
    ordered = sorted(records, key=order_key)
    valid = [r for r in ordered if r.valid]
    reasons: dict[str, str] = {}
    if valid:
        reasons[valid[-1].name] = "newest valid"
    if policy.keep_latest is None:
        for r in valid:
            reasons.setdefault(r.name, "policy keeps all")
    else:
        for r in valid[-policy.keep_latest:] if policy.keep_latest else []:
            reasons.setdefault(r.name, f"among the newest {policy.keep_latest}")
        if policy.keep_best and policy.metric:
            scored = [(s, r) for r in valid if (s := _score(r, policy.metric)) is not None]
            # Ties go to the newer checkpoint.
            scored.sort(key=lambda sr: (sr[0] if policy.better == "min" else -sr[0], [-x for x in order_key(sr[1])[1]]))
            for rank, (score, r) in enumerate(scored[: policy.keep_best], start=1):
                reasons.setdefault(r.name, f"best #{rank} by {policy.metric} ({score:.6g})")
    newest_valid = order_key(valid[-1]) if valid else None
    plan = RetentionPlan()
    for r in ordered:
        if r.name in reasons:
            plan.keep.append((r, reasons[r.name]))
        elif r.valid:
            plan.delete.append((r, f"outside the policy ({policy.describe()})"))
        elif r.position is None:
            plan.keep.append((r, f"invalid ({r.problem}), position unknown: left for a person to judge"))
        elif newest_valid is not None and order_key(r) < newest_valid:
            plan.delete.append((r, f"invalid ({r.problem}) and older than the newest valid checkpoint"))
        else:
            plan.keep.append((r, f"invalid ({r.problem}) but newer than every valid checkpoint: left for a person to judge"))
    return plan


def apply_plan(fs: pafs.FileSystem, plan: RetentionPlan) -> list[CheckpointRecord]:
    """Delete what the plan deletes; returns the deleted records."""
    deleted = []
    for record, _ in plan.delete:
        delete_checkpoint(fs, record.path)
        deleted.append(record)
    return deleted
