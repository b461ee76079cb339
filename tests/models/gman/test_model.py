"""GMAN in Keras 3: the seed's parameter counts, shapes, attention semantics and stable variable paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.gman.config import GmanConfig
from models.gman.model import GMAN, TemporalAttention, SpatialAttention, build_model, count_trainable, parameter_count
from raylab.config import resolve_config

EXPERIMENT = Path(__file__).resolve().parents[3] / "experiments" / "gman.yaml"
# Seed 001's figures (trainable variables, BatchNorm gamma/beta included).
SEED_COUNTS = {"quick": 30_993, "medium": 187_885, "full": 900_801}


def tiny(**extra) -> GmanConfig:
    return GmanConfig(**{"L": 1, "K": 2, "d": 3, "P": 6, "Q": 4, **extra})


def inputs(cfg: GmanConfig, batch: int, sensors: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(20, 70, (batch, cfg.P, sensors)).astype("float32")
    te = np.stack([rng.integers(0, 7, (batch, cfg.P + cfg.Q)), rng.integers(0, 288, (batch, cfg.P + cfg.Q))], -1).astype("int32")
    return x, te


@pytest.mark.parametrize("stage", SEED_COUNTS)
def test_each_stage_has_the_seeds_parameter_count(stage):
    cfg = resolve_config(GmanConfig, EXPERIMENT, stage, {})
    assert (cfg.L, cfg.K, cfg.d) == {"quick": (2, 4, 4), "medium": (3, 6, 6), "full": (5, 8, 8)}[stage]
    assert parameter_count(cfg) == SEED_COUNTS[stage]


def test_parameter_count_does_not_depend_on_the_number_of_sensors():
    cfg = resolve_config(GmanConfig, EXPERIMENT, "quick", {})
    counts = {n: count_trainable(build_model(cfg, np.zeros((n, 64), "float32"), 0.0, 1.0)) for n in (3, 207, 325)}
    assert set(counts.values()) == {SEED_COUNTS["quick"]}


def test_se_dims_and_time_slots_change_the_count_as_the_first_fc_layers_say():
    base = parameter_count(tiny())
    D = tiny().D
    assert parameter_count(tiny(se_dims=32)) == base - 32 * D
    assert parameter_count(tiny(time_slot_minutes=10)) == base - 144 * D


@pytest.mark.parametrize("batch, sensors", [(1, 2), (3, 5)])
def test_forecast_has_shape_batch_q_sensors(batch, sensors):
    cfg = tiny()
    model = build_model(cfg, np.random.default_rng(1).normal(size=(sensors, 64)), 50.0, 10.0)
    for training in (False, True):
        out = np.asarray(model(inputs(cfg, batch, sensors), training=training))
        assert out.shape == (batch, cfg.Q, sensors)
        assert np.isfinite(out).all()


def test_wrong_spatial_embedding_width_is_refused():
    with pytest.raises(ValueError, match="se_dims=64"):
        GMAN(tiny(), np.zeros((4, 16), "float32"), 0.0, 1.0)


def _layer_output(layer, x, ste):
    return np.asarray(layer(x, ste, training=False))


def test_causal_temporal_mask_hides_later_steps_only_when_on():
    rng = np.random.default_rng(0)
    x, ste = rng.normal(size=(1, 5, 3, 6)).astype("float32"), rng.normal(size=(1, 5, 3, 6)).astype("float32")
    changed = x.copy()
    changed[:, -1] += 5.0  # only the last step differs
    for causal in (True, False):
        layer = TemporalAttention(tiny(temporal_causal_mask=causal), name="temporal")
        before, after = _layer_output(layer, x, ste), _layer_output(layer, changed, ste)
        earlier_unchanged = np.allclose(before[:, :-1], after[:, :-1], atol=1e-6)
        assert earlier_unchanged == causal
        assert not np.allclose(before[:, -1], after[:, -1])


def test_spatial_attention_is_equivariant_to_reordering_sensors():
    rng = np.random.default_rng(2)
    x, ste = rng.normal(size=(2, 4, 5, 6)).astype("float32"), rng.normal(size=(2, 4, 5, 6)).astype("float32")
    layer = SpatialAttention(tiny(), name="spatial")
    order = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(_layer_output(layer, x, ste)[:, :, order], _layer_output(layer, x[:, :, order], ste[:, :, order]), atol=1e-5)


def test_variable_paths_are_explicit_unique_and_the_same_when_built_again():
    cfg = tiny(output_dropout=0.1)
    first = [v.path for v in build_model(cfg, np.zeros((3, 64)), 0.0, 1.0).variables]
    second = [v.path for v in build_model(cfg, np.zeros((3, 64)), 0.0, 1.0).variables]
    assert first == second  # no auto-numbered dense_2 / seed_generator_7 names
    assert len(set(first)) == len(first)
    assert all(p.startswith("gman/") for p in first)
    assert "gman/output/dropout_1/seed/seed_generator_state" in first


def test_a_smaller_stage_is_a_subset_of_a_larger_one_by_path():
    """The ladder's warm start matches by path: quick's encoder_0 is medium's encoder_0."""
    small = {v.path for v in build_model(tiny(L=1), np.zeros((3, 64)), 0.0, 1.0).variables}
    large = {v.path for v in build_model(tiny(L=2), np.zeros((3, 64)), 0.0, 1.0).variables}
    assert small < large
    assert all("_1/" in p for p in large - small)


def test_model_normalises_inputs_and_denormalises_forecasts_with_the_training_mean_and_std():
    import keras

    cfg = tiny()
    x, te = inputs(cfg, 2, 3)
    outputs = []
    for mean, std in ((0.0, 1.0), (55.0, 8.0)):
        keras.utils.set_random_seed(4)
        model = build_model(cfg, np.ones((3, 64)), mean, std)
        outputs.append(np.asarray(model((x * std + mean, te), training=False)))
    np.testing.assert_allclose(outputs[1], outputs[0] * 8.0 + 55.0, rtol=1e-4)


def test_the_seed_decides_the_initial_weights():
    import keras

    def kernel(seed: int) -> np.ndarray:
        keras.utils.set_random_seed(seed)
        return np.asarray(build_model(tiny(), np.zeros((3, 64)), 0.0, 1.0).input_fc.steps[0][1].kernel)

    np.testing.assert_array_equal(kernel(1), kernel(1))
    assert not np.array_equal(kernel(1), kernel(2))
