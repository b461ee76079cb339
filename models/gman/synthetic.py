"""A synthetic road network written as a METR-LA-style HDF5 file plus a node2vec-style SE file.

Sensors sit along one road (a chain graph). Speeds have a weekly pattern —
weekday morning and evening rush-hour dips, a mild weekend midday dip — whose
depth changes from day to day, and incidents; both travel downstream, reaching
sensor s `lag_steps` x s later. On top: persistent (AR-1) and white noise, and
about 1% zeros (missing readings). What the model can learn and the baselines
cannot: today's rush-hour strength and incidents are visible upstream before
they arrive, while the historical average sees only the typical week and the
last value only the present.

The files go to one folder written once, atomically (`raylab.datasets.write_once`),
so every run — and every Ray worker — reads the same files through the real
loaders; a complete folder with the same parameters is reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.gman.data import laplacian_embedding
from raylab.datasets import write_once

GENERATOR_VERSION = 1
TRAFFIC_FILE = "traffic.h5"
SE_FILE = "SE.txt"
_START = "2012-03-05"  # a Monday, the same week as METR-LA's first rows
_STEPS_PER_DAY = 288  # 5-minute rows


def chain_adjacency(num_sensors: int) -> np.ndarray:
    """Road graph: sensor i feeds sensor i + 1."""
    adjacency = np.zeros((num_sensors, num_sensors))
    i = np.arange(num_sensors - 1)
    adjacency[i, i + 1] = adjacency[i + 1, i] = 1.0
    return adjacency


def speeds(num_sensors: int, days: int, seed: int, lag_steps: int = 2) -> np.ndarray:
    """[days * 288, num_sensors] speeds in mph, 0 = missing."""
    rng = np.random.default_rng([seed, num_sensors, days])
    steps = days * _STEPS_PER_DAY
    hours = (np.arange(steps) % _STEPS_PER_DAY) / 12.0
    day = np.arange(steps) // _STEPS_PER_DAY
    weekday = (day % 7) < 5
    free_flow = rng.uniform(60.0, 70.0, num_sensors)
    depth = rng.uniform(0.6, 1.0, num_sensors)  # how much each sensor suffers from congestion
    strength = rng.uniform(0.5, 1.5, (days, 2))  # this day's morning / evening rush strength
    out = np.empty((steps, num_sensors))
    for s in range(num_sensors):
        lagged = np.clip(np.arange(steps) - s * lag_steps, 0, None)
        h, d, wd = hours[lagged], day[lagged], weekday[lagged]
        morning = 25.0 * strength[d, 0] * np.exp(-0.5 * ((h - 8.0) / 0.9) ** 2)
        evening = 22.0 * strength[d, 1] * np.exp(-0.5 * ((h - 17.5) / 1.1) ** 2)
        weekend = 8.0 * np.exp(-0.5 * ((h - 13.0) / 2.0) ** 2)
        out[:, s] = free_flow[s] - depth[s] * np.where(wd, morning + evening, weekend)
    out -= _incidents(rng, steps, num_sensors, lag_steps)
    out += _ar1_noise(rng, steps, num_sensors, phi=0.95, sigma=0.6) + rng.normal(0.0, 1.0, out.shape)
    out = np.clip(out, 3.0, 80.0)
    out[rng.random(out.shape) < 0.01] = 0.0
    return out.astype("float32")


def _incidents(rng: np.random.Generator, steps: int, num_sensors: int, lag_steps: int) -> np.ndarray:
    """Slow-downs starting at a random sensor and travelling downstream while they fade."""
    drop = np.zeros((steps, num_sensors))
    for _ in range(rng.poisson(steps / _STEPS_PER_DAY * 1.5)):
        start, origin = int(rng.integers(steps)), int(rng.integers(num_sensors))
        size, length = rng.uniform(10.0, 25.0), int(rng.integers(6, 13))  # 30-60 minutes
        for s in range(origin, num_sensors):
            t0 = start + (s - origin) * lag_steps
            if t0 >= steps:
                break
            t1 = min(steps, t0 + length)
            fade = 0.85 ** (s - origin)
            drop[t0:t1, s] += size * fade * np.sin(np.linspace(0.0, np.pi, length))[: t1 - t0]
    return drop


def _ar1_noise(rng: np.random.Generator, steps: int, num_sensors: int, phi: float, sigma: float) -> np.ndarray:
    shocks = rng.normal(0.0, sigma, (steps, num_sensors))
    out = np.empty_like(shocks)
    out[0] = shocks[0] / np.sqrt(1 - phi**2)
    for t in range(1, steps):
        out[t] = phi * out[t - 1] + shocks[t]
    return out


def write_synthetic(root: str | Path, num_sensors: int = 10, days: int = 21, seed: int = 0, se_dims: int = 64) -> tuple[Path, Path]:
    """Write (or reuse) `root/traffic.h5` and `root/SE.txt`; returns their paths.

    The content is a pure function of the arguments."""
    params = {"generator_version": GENERATOR_VERSION, "num_sensors": num_sensors, "days": days, "seed": seed, "se_dims": se_dims}
    folder = write_once(root, params, lambda staging: _write_files(staging, num_sensors, days, seed, se_dims))
    return folder / TRAFFIC_FILE, folder / SE_FILE


def _write_files(folder: Path, num_sensors: int, days: int, seed: int, se_dims: int) -> None:
    index = pd.date_range(_START, periods=days * _STEPS_PER_DAY, freq="5min")
    columns = [str(717000 + 17 * i) for i in range(num_sensors)]  # METR-LA-like sensor ids
    frame = pd.DataFrame(speeds(num_sensors, days, seed), index=index, columns=columns)
    frame.to_hdf(folder / TRAFFIC_FILE, key="df", mode="w")
    se = laplacian_embedding(chain_adjacency(num_sensors), se_dims)
    order = np.random.default_rng(seed).permutation(num_sensors)  # node2vec writes nodes in no particular order
    lines = [f"{num_sensors} {se_dims}"] + [f"{i} " + " ".join(f"{v:.6f}" for v in se[i]) for i in order]
    (folder / SE_FILE).write_text("\n".join(lines) + "\n")
