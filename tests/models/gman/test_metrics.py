"""Masked metrics, baselines, loss, learning-rate schedule and early stopping, on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.gman.config import GmanConfig
from models.gman.metrics import HistoricalAverage, horizon_metrics, last_value_forecast, masked_errors
from models.gman.recipe import StaircaseDecay, evaluations_since_best, make_optimizer, masked_abs_error_sums, masked_mae, should_stop


def test_masked_errors_ignore_zero_labels():
    label = np.array([10.0, 0.0, 20.0, 40.0])
    pred = np.array([12.0, 99.0, 17.0, 40.0])  # the 99 sits on a missing label
    out = masked_errors(pred, label)
    assert out["mae"] == pytest.approx((2 + 3 + 0) / 3)
    assert out["rmse"] == pytest.approx(math.sqrt((4 + 9 + 0) / 3))
    assert out["mape"] == pytest.approx((2 / 10 + 3 / 20 + 0) / 3)


def test_masked_errors_match_the_reference_formula():
    rng = np.random.default_rng(0)
    label = rng.uniform(10, 70, (50, 12, 4))
    label[rng.random(label.shape) < 0.1] = 0
    pred = label + rng.normal(0, 3, label.shape)
    with np.errstate(divide="ignore", invalid="ignore"):  # zhengchuanpan/GMAN utils.metric
        mask = (label != 0).astype(np.float32)
        mask /= mask.mean()
        mae = np.abs(pred - label)
        ref = (np.nan_to_num(mae * mask).mean(), np.sqrt(np.nan_to_num(mae**2 * mask).mean()), np.nan_to_num(mae / label * mask).mean())
    out = masked_errors(pred, label)
    assert (out["mae"], out["rmse"], out["mape"]) == pytest.approx(ref, rel=1e-5)


def test_all_missing_labels_give_nan_not_zero():
    assert all(math.isnan(v) for v in masked_errors(np.ones(3), np.zeros(3)).values())


def test_horizon_metrics_pick_steps_3_6_12_and_average_all_steps():
    label = np.full((2, 12, 1), 10.0)
    pred = label + np.arange(1, 13, dtype=float)[None, :, None]  # error of step q is q
    out = horizon_metrics(pred, label)
    assert (out["mae_h3"], out["mae_h6"], out["mae_h12"]) == (3.0, 6.0, 12.0)
    assert out["mape_h12"] == pytest.approx(1.2)
    assert out["mae"] == pytest.approx(6.5)
    with pytest.raises(ValueError, match="samples, Q, N"):
        horizon_metrics(pred[0], label[0])


def test_last_value_skips_missing_readings_and_falls_back():
    x = np.array([[[5.0, 0.0, 1.0], [6.0, 0.0, 0.0]]])  # [1 sample, P=2, N=3]
    out = last_value_forecast(x, Q=3, fallback=np.array([0.0, 42.0, 0.0]))
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [6.0] * 3  # last reading
    assert out[0, :, 1].tolist() == [42.0] * 3  # nothing seen: fallback
    assert out[0, :, 2].tolist() == [1.0] * 3  # last non-missing reading


def test_historical_average_is_the_same_slot_of_the_week_mean_without_zeros():
    # Two weeks of a 2-slot "day": slot (Mon, 0) saw 10 and 20; (Mon, 1) saw 30 and a missing 0.
    time = np.array([[d % 7, s] for d in range(14) for s in range(2)])
    values = np.full((28, 1), 50.0)
    values[[0, 14], 0] = [10.0, 20.0]
    values[[1, 15], 0] = [30.0, 0.0]
    ha = HistoricalAverage(values, time, steps_per_day=2)
    assert ha.forecast(np.array([[[0, 0], [0, 1], [3, 1]]]))[0, :, 0].tolist() == [15.0, 30.0, 50.0]
    assert ha.sensor_mean[0] == pytest.approx((10 + 20 + 30 + 50 * 24) / 27)


def test_historical_average_falls_back_to_the_sensor_mean_for_unseen_slots():
    ha = HistoricalAverage(np.array([[4.0], [6.0]]), np.array([[0, 0], [0, 1]]), steps_per_day=2)
    assert ha.forecast(np.array([[[6, 1]]]))[0, 0, 0] == 5.0


def test_masked_mae_loss_matches_numpy_and_survives_nan_on_missing_labels():
    label = np.array([[10.0, 0.0, 20.0]], "float32")
    pred = np.array([[12.0, np.nan, 17.0]], "float32")
    assert float(masked_mae(pred, label)) == pytest.approx(2.5)
    total, count = masked_abs_error_sums(pred, label)
    assert (float(total), float(count)) == (5.0, 2.0)
    assert float(masked_mae(pred, np.zeros_like(label))) == 0.0  # no valid label: 0, not NaN


def test_staircase_schedule_decays_every_decay_epoch_and_stops_at_the_floor():
    schedule = StaircaseDecay(initial=1e-3, decay_steps=10, rate=0.5, floor=2e-4)
    expected = {0: 1e-3, 9: 1e-3, 10: 5e-4, 19: 5e-4, 20: 2.5e-4, 30: 2e-4, 1000: 2e-4}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6)
        assert schedule.value(step) == pytest.approx(lr)
    assert StaircaseDecay(**schedule.get_config()).value(20) == pytest.approx(2.5e-4)


def test_optimizer_lr_follows_its_own_iteration_counter():
    cfg = GmanConfig(lr=0.002, decay_epoch=2, lr_decay_rate=0.7, min_lr=1e-5)
    opt = make_optimizer(cfg, steps_per_epoch=5)
    opt.iterations.assign(9)
    assert float(opt.learning_rate) == pytest.approx(0.002)
    opt.iterations.assign(10)  # decay_epoch 2 x 5 steps
    assert float(opt.learning_rate) == pytest.approx(0.0014)
    assert opt.name == "adam"


@pytest.mark.parametrize("history, wait", [
    ([], 0), ([3.0], 0), ([3.0, 2.0, 2.5], 1), ([3.0, 2.0, 2.5, 2.0], 0),  # a tie resets, as `<=` in the reference
    ([3.0, float("nan"), float("nan")], 2), ([float("nan")], 1),
])
def test_evaluations_since_best(history, wait):
    assert evaluations_since_best(history) == wait


def test_should_stop_after_patience_evaluations_without_improvement():
    history = [5.0, 4.0, 4.1, 4.2]
    assert not should_stop(history, patience=3)
    assert should_stop(history + [4.3], patience=3)
    assert not should_stop(history + [3.9], patience=3)
