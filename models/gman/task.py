"""GMAN traffic forecasting as a raylab task, trained by the TensorFlow loop (`raylab.tf_loop`).

The data is the HDF5 file at `data_path` (with the SE file at `se_path`, or a
spectral embedding derived from the data), else a synthetic road network written
in those same formats and read by the same loaders. Every evaluation reports, on
the validation split, masked MAE / RMSE / MAPE at horizons 3, 6, 12 and averaged,
beside the last-value and historical-average baselines at horizon 12; early
stopping (`patience`) watches the validation MAE, as the reference does.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from models.gman.config import GmanConfig
from models.gman.data import TrafficData, WindowSplit, load_traffic
from models.gman.metrics import ErrorSums, HistoricalAverage, last_value_forecast
from models.gman.model import build_model, parameter_count
from models.gman.recipe import make_optimizer, masked_abs_error_sums, should_stop
from models.gman.synthetic import write_synthetic
from raylab.cache import cache_dir
from raylab.config import ConfigError
from raylab.task import SampleOptions, SampleOutput, TaskContext, TfParts

BASELINE_HORIZON = 12


def data_files(cfg: GmanConfig) -> tuple[Path, Path | None]:
    """(traffic HDF5, SE file or None): the user's files, or the synthetic ones (written once)."""
    if cfg.data_path is not None:
        return cfg.data_path, cfg.se_path
    root = cfg.synthetic_dir or cache_dir("gman-synthetic", f"n{cfg.synthetic_sensors}-d{cfg.synthetic_days}-s{cfg.synthetic_seed}-e{cfg.se_dims}")
    h5, se = write_synthetic(root, cfg.synthetic_sensors, cfg.synthetic_days, cfg.synthetic_seed, cfg.se_dims)
    return h5, cfg.se_path or se


def baseline_metrics(data: TrafficData, split: WindowSplit, steps_per_day: int) -> dict[str, float]:
    """Last value and historical average (same slot of the week, training split) on `split`, at horizon 12."""
    history = HistoricalAverage(data.train.values, data.train.time, steps_per_day)
    sums = {"last_value": ErrorSums(split.Q), "historical_average": ErrorSums(split.Q)}
    for start in range(0, len(split), 1024):
        x, te, y = split.batch(np.arange(start, min(start + 1024, len(split))))
        sums["last_value"].add(last_value_forecast(x, split.Q, history.sensor_mean), y)
        sums["historical_average"].add(history.forecast(te[:, split.P:]), y)
    out = {}
    for name, s in sums.items():
        m = s.metrics(horizons=(BASELINE_HORIZON,))
        out.update({f"{name}_{k}_h{BASELINE_HORIZON}": m[f"{k}_h{BASELINE_HORIZON}"] for k in ("mae", "rmse", "mape")})
    return out


class GmanTask:
    config_cls = GmanConfig
    framework = "tensorflow"
    headline_metrics = ("loss", "mae", "mae_h12", "last_value_mae_h12", "historical_average_mae_h12")

    def check_workers(self, cfg: GmanConfig, world_size: int) -> None:
        if cfg.xla and cfg.sync_batchnorm and world_size > 1:
            # XLA cannot compile BatchNorm's all-reduce inside the step (TensorFlow: merge_call in a nested function).
            raise ConfigError(
                f"--workers {world_size}: xla=true cannot compile a step whose BatchNorm synchronises {world_size} workers; "
                "add --set xla=false, or --set sync_batchnorm=false (each worker then normalises with its own batch statistics)."
            )

    def build(self, cfg: GmanConfig, ctx: TaskContext) -> TfParts:
        self.check_workers(cfg, ctx.world_size)  # also for Python callers that skip raylab.launch
        h5, se = data_files(cfg)
        self.cfg = cfg
        self.data = load_traffic(h5, se, P=cfg.P, Q=cfg.Q, se_dims=cfg.se_dims, train_ratio=cfg.train_ratio,
                                 test_ratio=cfg.test_ratio, time_slot_minutes=cfg.time_slot_minutes)
        self.baselines = baseline_metrics(self.data, self.data.val, cfg.steps_per_day) if cfg.Q >= BASELINE_HORIZON else {}
        self._predict = None
        model = build_model(cfg, self.data.spatial_embedding, self.data.mean, self.data.std)
        metadata = {
            "data_path": str(h5), "spatial_embedding": self.data.se_source, "sensor_ids": list(self.data.series.sensor_ids),
            "input_mean": self.data.mean, "input_std": self.data.std,
            "split_samples": {"train": len(self.data.train), "val": len(self.data.val), "test": len(self.data.test)},
        }
        if cfg.data_path is not None and cfg.se_path is None:  # users often have only the h5: say what stands in for node2vec
            metadata["notices"] = [f"spatial embedding: {self.data.se_source}"]
        return TfParts(
            model=model, make_optimizer=lambda steps_per_epoch, _scheduled: make_optimizer(cfg, steps_per_epoch),
            train_data=self.data.train, metadata=metadata, jit_compile=cfg.xla,
            data_variables=("spatial_embedding", "input_mean", "input_std"),  # from this run's data, not a warm start's
        )

    def loss(self, model, batch) -> tuple[Any, Any, dict[str, Any]]:
        """Masked absolute error summed over the micro-batch and its number of valid labels:
        the loop's division gives the reference's masked MAE over the global batch."""
        x, te, y = batch
        total, count = masked_abs_error_sums(model((x, te), training=True), y)
        return total, count, {}

    def model_inputs(self, batch) -> tuple[Any, Any]:
        """What the model takes from a micro-batch (the health checks' own forward)."""
        x, te, _ = batch
        return x, te

    def predict(self, model, x: np.ndarray, te: np.ndarray) -> np.ndarray:
        """Forecasts [b, Q, N] in the data's units (inference mode: BN moving statistics, no dropout)."""
        if self._predict is None:
            import tensorflow as tf

            self._predict = tf.function(lambda a, b: model((a, b), training=False), reduce_retracing=True)
        return np.asarray(self._predict(x, te))

    def evaluate(self, model, ctx: TaskContext) -> dict[str, float]:
        """Validation metrics over the whole split: each worker scores its slice, the sums are added."""
        split = self.data.val
        mine = np.arange(ctx.world_rank, len(split), ctx.world_size)
        sums = ErrorSums(split.Q)
        for start in range(0, len(mine), self.cfg.eval_batch_size):
            x, te, y = split.batch(mine[start:start + self.cfg.eval_batch_size])
            sums.add(self.predict(model, x, te), y)
        total = ErrorSums.from_dict(ctx.all_reduce_sum(sums.as_dict()), split.Q)
        return {**total.metrics(), **self.baselines}

    def should_stop(self, history: list[dict[str, float]]) -> bool:
        """Early stopping: `patience` evaluations without a validation MAE at or below the best."""
        return should_stop([h.get("mae", float("nan")) for h in history], self.cfg.patience)

    def sample(self, model, n: int, ctx: TaskContext, options: SampleOptions | None = None) -> SampleOutput:
        """Forecasts for n validation windows spread over the split, one sensor each (the worst
        of the window, where forecasting is hardest), with history, truth and a plot."""
        split = self.data.val
        n = min(n, len(split))
        if n == 0:
            return SampleOutput(samples=[])
        indices = np.linspace(0, len(split) - 1, n).round().astype(int)
        x, te, y = split.batch(indices)
        pred = self.predict(model, x, te)
        timestamps, sensors = self.data.series.timestamps, self.data.series.sensor_ids
        samples, errors = [], []
        for i, index in enumerate(indices):
            valid = y[i] != 0
            per_sensor = np.where(valid, np.abs(pred[i] - y[i]), 0).sum(0) / np.maximum(valid.sum(0), 1)
            s = int(per_sensor.argmax())
            first = split.first_row + int(index) + split.P
            samples.append({
                "sensor": sensors[s], "forecast_from": str(timestamps[first]),
                "history": np.round(x[i, :, s], 2).tolist(), "forecast": np.round(pred[i, :, s], 2).tolist(),
                "actual": np.round(y[i, :, s], 2).tolist(), "mae": round(float(per_sensor[s]), 3),
            })
            errors.append(per_sensor[s])
        return SampleOutput(samples=samples, metrics={"sample_mae": float(np.mean(errors))}, png=_plot(samples))

    def describe(self, cfg: GmanConfig) -> str:
        data = str(cfg.data_path) if cfg.data_path else f"synthetic {cfg.synthetic_sensors} sensors x {cfg.synthetic_days} days"
        se = str(cfg.se_path) if cfg.se_path else ("spectral SE from the data" if cfg.data_path else "generated SE")
        return (f"L{cfg.L} K{cfg.K} d{cfg.d}, P{cfg.P}->Q{cfg.Q}, {cfg.max_epochs} epochs x batch {cfg.per_worker_batch_size}/worker, "
                f"{'XLA, ' if cfg.xla else ''}{data}, {se}")

    def num_parameters(self, cfg: GmanConfig) -> int:
        return parameter_count(cfg)


def _plot(samples: list[dict[str, Any]]) -> bytes:
    """History, forecast and truth of each sample, side by side, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 2.6), squeeze=False)
    for ax, sample in zip(axes[0], samples):
        p, q = len(sample["history"]), len(sample["forecast"])
        actual = np.array(sample["actual"], dtype=float)
        ax.plot(range(p), sample["history"], color="gray", label="history")
        ax.plot(range(p, p + q), np.where(actual == 0, np.nan, actual), color="black", label="actual")
        ax.plot(range(p, p + q), sample["forecast"], color="tab:red", label="forecast")
        ax.set_title(f"sensor {sample['sensor']}\n{sample['forecast_from']}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
