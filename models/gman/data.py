"""Traffic data for GMAN: the METR-LA / PeMS-Bay HDF5 file, the node2vec SE file,
a spectral embedding when there is no SE file, and windows over a time-ordered split.

Formats (as distributed with DCRNN / GMAN):

    traffic HDF5   pandas `DataFrame.to_hdf(path, key="df")`; rows are a 5-minute
                   DatetimeIndex, columns the sensor ids, values speeds, 0 = missing
    SE text        first line `N dims`, then one line per sensor: `index v1 ... vdims`
                   (word2vec text as node2vec writes it; the index is the sensor's
                   column position in the HDF5 file; lines in any order)

Time of day is `(index - index.normalize()) // slot` (the reference's
`index.freq.delta` is gone in pandas >= 2), day of week `index.weekday`. The
split is time-ordered: the first `train_ratio` of the rows, the last
`test_ratio`, validation between; a sample is P history rows and the Q rows
after them, never crossing a split boundary (the reference's `seq2instance`).
Windows are views into the series, so METR-LA (34,272 x 207) is not copied 24x.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raylab.datasets import DataError

__all__ = ["DataError", "TrafficData", "TrafficSeries", "WindowSplit", "correlation_embedding", "laplacian_embedding",
           "load_traffic", "read_spatial_embedding", "read_traffic_h5", "split_rows"]


@dataclass(frozen=True)
class TrafficSeries:
    """A whole traffic file: readings [T, N] (0 = missing) and time features [T, 2]."""

    path: Path
    values: np.ndarray  # float32 [T, N]
    time: np.ndarray  # int32 [T, 2]: day of week (Monday 0), time-of-day slot
    timestamps: pd.DatetimeIndex
    sensor_ids: tuple[str, ...]

    @property
    def num_sensors(self) -> int:
        return self.values.shape[1]


def read_traffic_h5(path: str | Path, time_slot_minutes: int = 5) -> TrafficSeries:
    """Read a METR-LA / PeMS-Bay style HDF5 file; DataError naming the file on any problem."""
    path = Path(path)
    frame = _read_frame(path)
    index = frame.index
    if not isinstance(index, pd.DatetimeIndex):
        raise DataError(
            f"traffic file {path}: the index of 'df' holds {index.dtype} values (first {index[0]!r}), "
            "not timestamps; rows must be a DatetimeIndex."
        )
    if index.hasnans:
        raise DataError(f"traffic file {path}: the index has a missing timestamp at row {int(np.argmax(index.isna()))}.")
    steps = np.diff(index.asi8)
    if (steps <= 0).any():
        row = int(np.argmax(steps <= 0)) + 1
        raise DataError(f"traffic file {path}: timestamps must increase, but row {row} ({index[row]}) does not follow {index[row - 1]}.")
    seconds = (index - index.normalize()).total_seconds().to_numpy()
    slot = time_slot_minutes * 60
    off_slot = np.flatnonzero(seconds % slot)
    if off_slot.size:
        row = int(off_slot[0])
        raise DataError(
            f"traffic file {path}: row {row} ({index[row]}) is not on a {time_slot_minutes}-minute slot; "
            "resample the file or set time_slot_minutes."
        )
    bad_columns = [str(c) for c, dtype in frame.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if bad_columns:
        raise DataError(f"traffic file {path}: column {bad_columns[0]!r} is not numeric ({frame[bad_columns[0]].dtype}).")
    # NaN means missing too; the model and metrics treat 0 as missing, as METR-LA does.
    values = np.nan_to_num(frame.to_numpy(dtype="float32"), nan=0.0)
    time = np.stack([index.day_of_week.to_numpy(), (seconds // slot).astype(np.int64)], axis=1).astype("int32")
    return TrafficSeries(path, values, time, index, tuple(str(c) for c in frame.columns))


def _read_frame(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"traffic file {path} does not exist.")
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = store.keys()
            frame = store["df"] if "/df" in keys else None
    except Exception as exc:  # PyTables raises its own error types for non-HDF5 input
        raise DataError(f"traffic file {path} is not a readable pandas HDF5 file ({type(exc).__name__}: {exc}).") from None
    if frame is None:
        found = ", ".join(k.lstrip("/") for k in keys) or "none"
        raise DataError(f"traffic file {path} has no key 'df' (keys found: {found}); write it with DataFrame.to_hdf(path, key='df').")
    if not isinstance(frame, pd.DataFrame) or frame.shape[1] == 0 or frame.shape[0] == 0:
        raise DataError(f"traffic file {path}: key 'df' must hold a DataFrame with one column per sensor and one row per time step.")
    return frame


def read_spatial_embedding(path: str | Path, num_sensors: int, dims: int, traffic_path: str | Path = "the traffic file") -> np.ndarray:
    """Read a node2vec SE text file into [num_sensors, dims]; DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SE file {path} does not exist.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"SE file {path} cannot be read as text ({exc}).") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or not all(t.isdigit() for t in header):
        raise DataError(f"SE file {path} line 1: expected 'N dims' (two integers), got {lines[0][:60] if lines else ''!r}.")
    n, file_dims = int(header[0]), int(header[1])
    if n != num_sensors:
        raise DataError(f"SE file {path} describes {n} sensors but {traffic_path} has {num_sensors} sensor columns.")
    if file_dims != dims:
        raise DataError(f"SE file {path} has {file_dims} dimensions but se_dims is {dims}; set se_dims={file_dims}.")
    se = np.full((n, dims), np.nan, dtype="float32")
    for number, line in enumerate(lines[1:], start=2):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != dims + 1:
            raise DataError(f"SE file {path} line {number}: expected an index and {dims} values, got {len(tokens)} fields.")
        try:
            index, row = int(tokens[0]), np.array(tokens[1:], dtype="float32")
        except ValueError:
            raise DataError(f"SE file {path} line {number}: non-numeric field in {line[:60]!r}.") from None
        if not 0 <= index < n:
            raise DataError(f"SE file {path} line {number}: sensor index {index} is outside 0..{n - 1}.")
        if not np.isnan(se[index, 0]):
            raise DataError(f"SE file {path} line {number}: sensor index {index} appears a second time.")
        if not np.isfinite(row).all():
            raise DataError(f"SE file {path} line {number}: values must be finite numbers.")
        se[index] = row
    missing = np.flatnonzero(np.isnan(se[:, 0]))
    if missing.size:
        raise DataError(f"SE file {path} has no line for sensor index {int(missing[0])} ({missing.size} of {n} missing).")
    return se


def laplacian_embedding(adjacency: np.ndarray, dims: int) -> np.ndarray:
    """Spectral embedding [N, dims]: Laplacian eigenmaps of a weighted graph
    (smallest eigenvalues, the trivial one skipped), scaled by sqrt(N) to O(1)
    entries like node2vec's, sign-fixed so the result is deterministic, zero-padded
    when the graph has fewer than dims + 1 nodes."""
    w = np.nan_to_num(np.asarray(adjacency, dtype="float64"))
    w = np.maximum((w + w.T) / 2, 0.0)
    np.fill_diagonal(w, 0.0)
    degree = w.sum(axis=1)
    inv_sqrt = np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0)
    n = w.shape[0]
    laplacian = np.eye(n) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    _, vectors = np.linalg.eigh(laplacian)
    # Laplacian eigenmaps (Belkin & Niyogi): D^-1/2 u solves L f = lambda D f; isolated sensors get 0.
    vectors = inv_sqrt[:, None] * vectors[:, 1 : dims + 1]
    norms = np.linalg.norm(vectors, axis=0)
    vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0) * np.sqrt(n)
    largest = np.abs(vectors).argmax(axis=0)
    vectors *= np.where(vectors[largest, np.arange(vectors.shape[1])] < 0, -1.0, 1.0)
    out = np.zeros((n, dims), dtype="float32")
    out[:, : vectors.shape[1]] = vectors
    return out


def correlation_embedding(values: np.ndarray, dims: int) -> np.ndarray:
    """Spatial embedding from the readings alone: a Laplacian embedding of the graph whose
    edge weights are the sensors' positive correlations (missing readings ignored)."""
    x = np.asarray(values, dtype="float64").copy()
    missing = x == 0
    x[missing] = np.nan
    column_mean = np.nan_to_num(np.nanmean(np.where(missing.all(axis=0), 0.0, x), axis=0))
    x = np.where(missing, column_mean, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(x, rowvar=False) if x.shape[1] > 1 else np.ones((1, 1))
    return laplacian_embedding(np.nan_to_num(np.atleast_2d(corr)), dims)


class WindowSplit:
    """Samples of one split: X = P rows, Y = the next Q rows, TE = their P + Q time features."""

    def __init__(self, values: np.ndarray, time: np.ndarray, P: int, Q: int, first_row: int):
        self.values, self.time, self.P, self.Q, self.first_row = values, time, P, Q, first_row
        # [samples, P + Q, N] and [samples, P + Q, 2] views: no copy.
        self._values = np.lib.stride_tricks.sliding_window_view(values, P + Q, axis=0).swapaxes(1, 2)
        self._time = np.lib.stride_tricks.sliding_window_view(time, P + Q, axis=0).swapaxes(1, 2)

    def __len__(self) -> int:
        return self._values.shape[0]

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x [b,P,N] float32, te [b,P+Q,2] int32, y [b,Q,N] float32) for sample indices."""
        indices = np.asarray(indices, dtype=np.int64)
        window = self._values[indices]
        return window[:, : self.P], self._time[indices], window[:, self.P :]

    def input_mean_std(self) -> tuple[float, float]:
        """Mean and std over every X window entry (the reference normalises by np.mean/np.std of trainX).

        Row r appears in count[r] windows; weighting each row by it gives the same
        figures without building the [samples, P, N] array."""
        count = np.convolve(np.ones(len(self)), np.ones(self.P))  # rows 0 .. len+P-2
        rows = self.values[: count.size].astype("float64")
        n = count.sum() * rows.shape[1]
        mean = float((count * rows.sum(axis=1)).sum() / n)
        var = float((count * ((rows - mean) ** 2).sum(axis=1)).sum() / n)
        return mean, float(np.sqrt(var))


@dataclass(frozen=True)
class TrafficData:
    """The three splits, the spatial embedding and the input normalisation."""

    series: TrafficSeries
    train: WindowSplit
    val: WindowSplit
    test: WindowSplit
    spatial_embedding: np.ndarray  # [N, se_dims]
    se_source: str  # where the spatial embedding came from, for the run's notes
    mean: float
    std: float


def split_rows(num_rows: int, train_ratio: float, test_ratio: float) -> tuple[int, int, int]:
    """(train, val, test) row counts, rounded as the reference does."""
    train = round(train_ratio * num_rows)
    test = round(test_ratio * num_rows)
    return train, num_rows - train - test, test


def load_traffic(data_path: str | Path, se_path: str | Path | None, *, P: int, Q: int, se_dims: int,
                 train_ratio: float, test_ratio: float, time_slot_minutes: int = 5) -> TrafficData:
    """Read the files, split by time and prepare the spatial embedding."""
    series = read_traffic_h5(data_path, time_slot_minutes)
    num_train, num_val, num_test = split_rows(len(series.values), train_ratio, test_ratio)
    smallest = min(num_train, num_val, num_test)
    if smallest < P + Q:
        raise DataError(
            f"traffic file {series.path} has {len(series.values)} rows: its smallest split gets {smallest}, "
            f"fewer than P + Q = {P + Q}; use a longer file or adjust train_ratio/test_ratio."
        )
    bounds = {"train": (0, num_train), "val": (num_train, num_train + num_val), "test": (num_train + num_val, len(series.values))}
    splits = {k: WindowSplit(series.values[a:b], series.time[a:b], P, Q, a) for k, (a, b) in bounds.items()}
    mean, std = splits["train"].input_mean_std()
    if not std > 0:
        raise DataError(f"traffic file {series.path}: every training reading is {mean}; there is nothing to learn.")
    if se_path is not None:
        se = read_spatial_embedding(se_path, series.num_sensors, se_dims, series.path)
        source = f"node2vec file {se_path}"
    else:
        se = correlation_embedding(splits["train"].values, se_dims)
        source = f"spectral embedding of the sensors' correlation graph (training split of {series.path.name}; no se_path)"
    return TrafficData(series, splits["train"], splits["val"], splits["test"], se, source, mean, std)
