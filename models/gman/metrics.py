"""Masked traffic-forecast metrics and the two baselines GMAN must beat.

A label of 0 is a missing reading: it is left out of every average (the
reference's `utils.metric` rescales the mask to mean 1, which is the same as
averaging over the non-zero labels). MAPE is a fraction (0.05 = 5%). Horizon h
is the h-th predicted step (h = 12: 60 minutes ahead on 5-minute data); the
plain `mae` / `rmse` / `mape` average the per-step figures over all Q steps, as
the reference's "average" row does.
"""

from __future__ import annotations

import numpy as np

HORIZONS = (3, 6, 12)


def masked_errors(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Masked MAE, RMSE and MAPE over every entry whose label is not 0 (NaN when there is none)."""
    pred, label = np.asarray(pred, dtype="float64"), np.asarray(label, dtype="float64")
    valid = label != 0
    if not valid.any():
        return {"mae": float("nan"), "rmse": float("nan"), "mape": float("nan")}
    err = np.abs(pred[valid] - label[valid])
    return {"mae": float(err.mean()), "rmse": float(np.sqrt((err**2).mean())), "mape": float((err / np.abs(label[valid])).mean())}


class ErrorSums:
    """Per-step sums of masked errors, added batch by batch and across workers; exact metrics at the end.

    `as_dict` / `from_dict` give flat float sums, so workers can add theirs with one all-reduce."""

    FIELDS = ("abs", "sq", "pct", "count")

    def __init__(self, steps: int):
        self.sums = {f: np.zeros(steps) for f in self.FIELDS}

    def add(self, pred: np.ndarray, label: np.ndarray) -> "ErrorSums":
        pred, label = np.asarray(pred, dtype="float64"), np.asarray(label, dtype="float64")
        if pred.shape != label.shape or pred.ndim != 3:
            raise ValueError(f"predictions {pred.shape} and labels {label.shape} must both be [samples, Q, N]")
        valid = label != 0
        err = np.where(valid, np.abs(pred - label), 0.0)
        self.sums["abs"] += err.sum(axis=(0, 2))
        self.sums["sq"] += (err**2).sum(axis=(0, 2))
        self.sums["pct"] += np.divide(err, np.abs(label), out=np.zeros_like(err), where=valid).sum(axis=(0, 2))
        self.sums["count"] += valid.sum(axis=(0, 2))
        return self

    def as_dict(self) -> dict[str, float]:
        return {f"{f}_{q}": float(v) for f, values in self.sums.items() for q, v in enumerate(values)}

    @classmethod
    def from_dict(cls, sums: dict[str, float], steps: int) -> "ErrorSums":
        out = cls(steps)
        for f in cls.FIELDS:
            out.sums[f] = np.array([sums[f"{f}_{q}"] for q in range(steps)])
        return out

    def metrics(self, horizons: tuple[int, ...] = HORIZONS) -> dict[str, float]:
        """{mae_h3, rmse_h3, mape_h3, ..., mae, rmse, mape}; NaN for a step without any valid label."""
        count = self.sums["count"]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_step = {
                "mae": np.where(count > 0, self.sums["abs"] / count, np.nan),
                "rmse": np.where(count > 0, np.sqrt(self.sums["sq"] / count), np.nan),
                "mape": np.where(count > 0, self.sums["pct"] / count, np.nan),
            }
        out: dict[str, float] = {}
        for h in horizons:
            if h <= len(count):
                out.update({f"{k}_h{h}": float(v[h - 1]) for k, v in per_step.items()})
        for k, v in per_step.items():
            out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
        return out


def horizon_metrics(pred: np.ndarray, label: np.ndarray, horizons: tuple[int, ...] = HORIZONS) -> dict[str, float]:
    """{mae_h3, rmse_h3, mape_h3, ..., mae, rmse, mape} for predictions and labels [samples, Q, N]."""
    pred = np.asarray(pred)
    return ErrorSums(pred.shape[1] if pred.ndim == 3 else 0).add(pred, label).metrics(horizons)


def last_value_forecast(x: np.ndarray, Q: int, fallback: np.ndarray) -> np.ndarray:
    """Every future step = the sensor's last non-missing reading in the history window
    ([samples, P, N] -> [samples, Q, N]); `fallback` [N] where the whole window is missing."""
    x = np.asarray(x)
    seen = x != 0
    last = x.shape[1] - 1 - np.argmax(seen[:, ::-1], axis=1)  # index of the last non-zero step
    value = np.take_along_axis(x, last[:, None, :], axis=1)[:, 0]
    value = np.where(seen.any(axis=1), value, np.asarray(fallback)[None, :])
    return np.repeat(value[:, None, :], Q, axis=1)


class HistoricalAverage:
    """Mean reading per (day of week, time of day, sensor) over the training split, zeros ignored;
    a slot never seen in training falls back to the sensor's overall training mean."""

    def __init__(self, values: np.ndarray, time: np.ndarray, steps_per_day: int):
        values = np.asarray(values, dtype="float64")
        slot = np.asarray(time[:, 0], dtype=np.int64) * steps_per_day + np.asarray(time[:, 1], dtype=np.int64)
        n_slots, valid = 7 * steps_per_day, values != 0
        sums = np.zeros((n_slots, values.shape[1]))
        counts = np.zeros_like(sums)
        np.add.at(sums, slot, np.where(valid, values, 0.0))
        np.add.at(counts, slot, valid)
        n_valid = valid.sum(axis=0)
        self.sensor_mean = np.divide(sums.sum(axis=0), n_valid, out=np.zeros(values.shape[1]), where=n_valid > 0)
        self.table = np.where(counts > 0, sums / np.maximum(counts, 1), self.sensor_mean[None, :])
        self.steps_per_day = steps_per_day

    def forecast(self, future_time: np.ndarray) -> np.ndarray:
        """[samples, Q, 2] time features of the predicted steps -> [samples, Q, N]."""
        slot = future_time[..., 0].astype(np.int64) * self.steps_per_day + future_time[..., 1].astype(np.int64)
        return self.table[slot]
