"""GMAN data: the real HDF5 / SE formats, the time-ordered split, windows, and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.gman.data import (
    DataError, correlation_embedding, laplacian_embedding, load_traffic, read_spatial_embedding, read_traffic_h5, split_rows,
)
from models.gman.synthetic import chain_adjacency, speeds, write_synthetic


def write_h5(path: Path, frame, key: str = "df") -> Path:
    frame.to_hdf(path, key=key, mode="w")
    return path


def frame(rows: int = 400, sensors: int = 3, start: str = "2012-03-01 00:00") -> pd.DataFrame:
    index = pd.date_range(start, periods=rows, freq="5min")
    values = 50 + 10 * np.sin(np.arange(rows * sensors).reshape(rows, sensors) / 7.0)
    return pd.DataFrame(values, index=index, columns=[f"77{i}" for i in range(sensors)])


def write_se(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def seq2instance(data: np.ndarray, P: int, Q: int):
    """The reference's windowing, written out, to compare against."""
    n = len(data) - P - Q + 1
    return np.stack([data[i:i + P] for i in range(n)]), np.stack([data[i + P:i + P + Q] for i in range(n)])


def test_synthetic_files_are_the_real_formats(traffic_files):
    h5, se_file = traffic_files
    raw = pd.read_hdf(h5, key="df")
    assert isinstance(raw.index, pd.DatetimeIndex) and raw.shape == (7 * 288, 6)
    assert raw.index[0].weekday() == 0 and (raw.index[1] - raw.index[0]) == pd.Timedelta("5min")
    zeros = float((raw.to_numpy() == 0).mean())
    assert 0.003 < zeros < 0.03
    header, *lines = se_file.read_text().splitlines()
    assert header == "6 64" and len(lines) == 6 and all(len(line.split()) == 65 for line in lines)
    assert sorted(int(line.split()[0]) for line in lines) == list(range(6))


def test_synthetic_rush_hour_dips_on_weekdays_and_travels_downstream():
    values = speeds(num_sensors=8, days=14, seed=0).astype("float64")
    values[values == 0] = np.nan
    days = values.reshape(14, 288, 8)
    weekday, weekend = np.nanmean(days[[0, 1, 2, 3, 4, 7, 8, 9, 10, 11]], axis=0), np.nanmean(days[[5, 6, 12, 13]], axis=0)
    morning = slice(7 * 12, 9 * 12)
    assert np.nanmean(weekday[morning]) < np.nanmean(weekend[morning]) - 5
    slowest = np.nanargmin(weekday[: 12 * 12], axis=0)  # the morning minimum of each sensor
    assert slowest[-1] > slowest[0]  # later downstream


def test_synthetic_is_written_once_and_reused(tmp_path):
    first = write_synthetic(tmp_path / "s", num_sensors=3, days=7, seed=1)
    stamp = first[0].stat().st_mtime_ns
    assert write_synthetic(tmp_path / "s", num_sensors=3, days=7, seed=1) == first
    assert first[0].stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    with pytest.raises(DataError, match="different arguments"):
        write_synthetic(tmp_path / "s", num_sensors=4, days=7, seed=1)


def test_reader_gives_values_and_time_features(tmp_path):
    f = frame(rows=300)
    f.iloc[5, 1] = np.nan  # missing as NaN reads as 0, like METR-LA's zeros
    series = read_traffic_h5(write_h5(tmp_path / "t.h5", f))
    assert series.values.dtype == np.float32 and series.values.shape == (300, 3)
    assert series.values[5, 1] == 0 and series.values[6, 1] == pytest.approx(f.iloc[6, 1])
    # 2012-03-01 is a Thursday (3); row 290 is the next day's 00:10 -> slot 2.
    assert tuple(series.time[0]) == (3, 0) and tuple(series.time[13]) == (3, 13) and tuple(series.time[290]) == (4, 2)
    assert series.sensor_ids == ("770", "771", "772")


def test_split_is_time_ordered_70_10_20_and_windows_match_the_reference(traffic_files):
    h5, se_file = traffic_files
    data = load_traffic(h5, se_file, P=12, Q=12, se_dims=64, train_ratio=0.7, test_ratio=0.2)
    rows = 7 * 288
    assert split_rows(rows, 0.7, 0.2) == (1411, 202, 403)
    assert (data.train.first_row, data.val.first_row, data.test.first_row) == (0, 1411, 1613)
    assert len(data.train) == 1411 - 23 and len(data.val) == 202 - 23 and len(data.test) == 403 - 23
    train_x, train_y = seq2instance(data.series.values[:1411], 12, 12)
    x, te, y = data.train.batch([0, 7, len(data.train) - 1])
    np.testing.assert_array_equal(x, train_x[[0, 7, -1]])
    np.testing.assert_array_equal(y, train_y[[0, 7, -1]])
    np.testing.assert_array_equal(te[1], data.series.time[7:31])
    test_x, _ = seq2instance(data.series.values[1613:], 12, 12)
    np.testing.assert_array_equal(data.test.batch([3])[0][0], test_x[3])
    # Normalisation: the reference's np.mean / np.std over every training X window.
    assert data.mean == pytest.approx(float(np.mean(train_x, dtype="float64")), rel=1e-9)
    assert data.std == pytest.approx(float(np.std(train_x, dtype="float64")), rel=1e-9)
    assert "node2vec file" in data.se_source


def test_se_file_lines_in_any_order_land_on_their_sensor(tmp_path):
    lines = ["3 2", "2 0.5 0.6", "0 0.1 0.2", "1 0.3 0.4"]
    se = read_spatial_embedding(write_se(tmp_path / "se.txt", lines), num_sensors=3, dims=2)
    np.testing.assert_allclose(se, [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], rtol=1e-6)


def test_without_se_file_a_spectral_embedding_is_derived_and_said_so(traffic_files):
    h5, _ = traffic_files
    data = load_traffic(h5, None, P=12, Q=12, se_dims=64, train_ratio=0.7, test_ratio=0.2)
    assert data.spatial_embedding.shape == (6, 64) and np.isfinite(data.spatial_embedding).all()
    assert "spectral embedding" in data.se_source and "no se_path" in data.se_source
    assert np.abs(data.spatial_embedding[:, :5]).sum() > 0 and not data.spatial_embedding[:, 5:].any()  # 5 = N - 1 eigenvectors
    again = load_traffic(h5, None, P=12, Q=12, se_dims=64, train_ratio=0.7, test_ratio=0.2)
    np.testing.assert_array_equal(again.spatial_embedding, data.spatial_embedding)
    # The run says so when it starts (a task notice, shown as a note on the display).
    from models.gman.config import GmanConfig
    from models.gman.task import GmanTask
    from raylab.task import TaskContext

    parts = GmanTask().build(GmanConfig(data_path=h5, L=1, K=2, d=2), TaskContext())
    assert parts.metadata["notices"] == [f"spatial embedding: {data.se_source}"]


def test_laplacian_embedding_orders_a_chain_along_its_first_vector():
    fiedler = laplacian_embedding(chain_adjacency(7), dims=4)[:, 0]
    assert np.all(np.diff(fiedler) > 0) or np.all(np.diff(fiedler) < 0)


def test_correlation_embedding_separates_two_groups_of_sensors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 1)), rng.normal(size=(500, 1))
    values = 50 + np.hstack([a + 0.1 * rng.normal(size=(500, 3)), b + 0.1 * rng.normal(size=(500, 3))])
    values[rng.random(values.shape) < 0.05] = 0  # missing readings are ignored, not read as speed 0
    first = correlation_embedding(values, dims=8)[:, 0]
    assert np.sign(first[:3]).tolist() == [np.sign(first[0])] * 3
    assert np.sign(first[3:]).tolist() == [-np.sign(first[0])] * 3


BROKEN_H5 = {
    "wrong key": (lambda p: write_h5(p, frame(), key="speeds"), r"has no key 'df' \(keys found: speeds\)"),
    "non-datetime index": (lambda p: write_h5(p, frame().reset_index(drop=True)), "not timestamps"),
    "unordered index": (lambda p: write_h5(p, frame().iloc[[0, 2, 1, *range(3, 400)]]), "must increase, but row 2"),
    "off-slot timestamps": (lambda p: write_h5(p, frame(start="2012-03-01 00:02")), "not on a 5-minute slot"),
    "text column": (lambda p: write_h5(p, frame().assign(**{"773": "x"})), "column '773' is not numeric"),
    "not hdf5": (lambda p: p.write_text("time,speed\n") and p, "not a readable pandas HDF5 file"),
    "missing": (lambda p: p, "does not exist"),
    "too short": (lambda p: write_h5(p, frame(rows=60)), "fewer than P \\+ Q = 24"),
}


@pytest.mark.parametrize("case", BROKEN_H5)
def test_broken_traffic_file_names_the_file_and_problem(tmp_path, case):
    make, message = BROKEN_H5[case]
    path = make(tmp_path / "bad.h5")
    with pytest.raises(DataError, match=message) as info:
        load_traffic(path, None, P=12, Q=12, se_dims=64, train_ratio=0.7, test_ratio=0.2)
    assert str(path) in str(info.value)


BROKEN_SE = {
    "sensor count": (["4 2", "0 1 2", "1 1 2", "2 1 2", "3 1 2"], "describes 4 sensors but .* has 3 sensor columns"),
    "dims": (["3 5"], "has 5 dimensions but se_dims is 2; set se_dims=5"),
    "non-numeric value": (["3 2", "0 1 2", "1 1 abc", "2 1 2"], "line 3: non-numeric field"),
    "short line": (["3 2", "0 1 2", "1 1", "2 1 2"], "line 3: expected an index and 2 values, got 2 fields"),
    "header": (["three 2"], "line 1: expected 'N dims'"),
    "index out of range": (["3 2", "0 1 2", "7 1 2", "2 1 2"], "line 3: sensor index 7 is outside 0..2"),
    "duplicate index": (["3 2", "0 1 2", "0 1 2", "2 1 2"], "line 3: sensor index 0 appears a second time"),
    "missing sensor": (["3 2", "0 1 2", "2 1 2"], "no line for sensor index 1"),
    "nan value": (["3 2", "0 1 2", "1 nan 2", "2 1 2"], "line 3: values must be finite"),
}


@pytest.mark.parametrize("case", BROKEN_SE)
def test_broken_se_file_names_the_file_and_line(tmp_path, case):
    lines, message = BROKEN_SE[case]
    h5 = write_h5(tmp_path / "t.h5", frame(sensors=3))
    se = write_se(tmp_path / "se.txt", lines)
    with pytest.raises(DataError, match=message) as info:
        load_traffic(h5, se, P=12, Q=12, se_dims=2, train_ratio=0.7, test_ratio=0.2)
    assert str(se) in str(info.value)
