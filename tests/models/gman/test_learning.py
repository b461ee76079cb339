"""GMAN learns: a short custom TensorFlow loop (GradientTape + Adam with the staircase
schedule) on the real loaders' windows of a synthetic file. The raylab loop's own
tests (phase 2) complement this one."""

from __future__ import annotations

import numpy as np

from models.gman.config import GmanConfig
from models.gman.data import load_traffic
from models.gman.metrics import horizon_metrics
from models.gman.model import build_model
from models.gman.recipe import make_optimizer, masked_mae


def test_masked_mae_falls_in_a_short_custom_loop(traffic_files):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    h5, se = traffic_files
    cfg = GmanConfig(L=1, K=2, d=4, lr=3e-3, per_worker_batch_size=16, decay_epoch=1)
    data = load_traffic(h5, se, P=cfg.P, Q=cfg.Q, se_dims=cfg.se_dims, train_ratio=0.7, test_ratio=0.2)
    model = build_model(cfg, data.spatial_embedding, data.mean, data.std)
    optimizer = make_optimizer(cfg, steps_per_epoch=60)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, te, y):
        with tf.GradientTape() as tape:
            loss = masked_mae(model((x, te), training=True), y)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    def val_mae() -> float:
        x, te, y = data.val.batch(np.arange(len(data.val)))
        return horizon_metrics(np.asarray(model((x, te), training=False)), y)["mae"]

    before = val_mae()
    order = np.random.default_rng(0).permutation(len(data.train))
    losses = [float(step(*data.train.batch(order[i * 16:(i + 1) * 16]))) for i in range(60)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses
    assert val_mae() < 0.6 * before
    assert int(optimizer.iterations) == 60
