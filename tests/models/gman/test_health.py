"""The gradient health checks on a TensorFlow task (raylab.tf_health): a block behind
tf.stop_gradient is named by `no_grad`, a NaN gradient behind a finite loss by `nonfinite_grads`
(policy stop ends the run naming the variable); a healthy GMAN run finds neither."""

from __future__ import annotations

import pytest

from models.gman.task import GmanTask
from raylab.health import HealthCheckFailed
from raylab.session import LocalSession
from raylab.tf_loop import train_tf


def config(traffic_files, **extra):
    h5, se = traffic_files
    values = {"data_path": str(h5), "se_path": str(se), "L": 1, "K": 2, "d": 2, "per_worker_batch_size": 8,
              "max_epochs": 1, "max_steps": 3, "log_every_steps": 1, "num_samples": 0, "eval_every_steps": 0, **extra}
    return GmanTask.config_cls.model_validate(values)


class DetachedBlock(GmanTask):
    """The spatial-embedding block's output behind tf.stop_gradient: its weights never learn (the
    TensorFlow form of seed 002's block computed without gradients)."""

    def build(self, cfg, ctx):
        import tensorflow as tf

        parts = super().build(cfg, ctx)
        block = parts.model.se_fc
        forward = block.call
        object.__setattr__(block, "call", lambda *args, **kwargs: tf.stop_gradient(forward(*args, **kwargs)))
        return parts


class NanGradient(GmanTask):
    """A finite loss whose gradient is NaN: the loss adds 0 x w, and w's gradient is made NaN."""

    def loss(self, model, batch):
        import tensorflow as tf

        @tf.custom_gradient
        def nan_gradient(x):
            return tf.identity(x), lambda dy: dy * float("nan")

        total, count, metrics = super().loss(model, batch)
        return total + 0.0 * tf.reduce_sum(nan_gradient(model.trainable_variables[0])), count, metrics


def findings(task, cfg, folder):
    updates: list[dict] = []
    train_tf(task, cfg, LocalSession(folder, keep_checkpoints=1, on_progress=updates.append))
    return [u["health_notice"] for u in updates if "health_notice" in u]


def test_a_block_the_loss_never_reaches_is_named(tmp_path, traffic_files):
    notices = findings(DetachedBlock(), config(traffic_files), tmp_path)
    assert len(notices) == 1, notices
    # the block's 2 dense layers and its batch norm: kernel, bias, gamma, beta
    assert notices[0].startswith("no_grad: 6 trainable variable(s) got no gradient at step 1: gman/se/batch_norm_0/beta")
    assert "(behind tf.stop_gradient, or not used by the loss)" in notices[0]


def test_a_nan_gradient_behind_a_finite_loss_stops_the_run_naming_the_variable(tmp_path, traffic_files):
    task = NanGradient()
    with pytest.raises(HealthCheckFailed) as caught:
        train_tf(task, config(traffic_files, health={"nonfinite_grads": "stop"}), LocalSession(tmp_path, keep_checkpoints=1))
    finding = caught.value.finding
    assert finding.check == "nonfinite_grads"
    assert finding.message.startswith("non-finite gradient at step 1 in gman/input/dense_0/kernel") and finding.message.endswith("while the loss was finite")


def test_a_healthy_gman_run_has_no_gradient_finding(tmp_path, traffic_files):
    assert findings(GmanTask(), config(traffic_files), tmp_path) == []


class InputBlind(GmanTask):
    """A model whose forecast ignores its input (the history and the time features zeroed
    inside it): the TensorFlow form of seed 003's network that sat at chance."""

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        model = parts.model
        forward = model.call
        object.__setattr__(model, "call", lambda inputs, **kwargs: forward((inputs[0] * 0.0, inputs[1] * 0), **kwargs))
        return parts


def dependence_notices(task, cfg, folder):
    return [n for n in findings(task, cfg, folder) if n.startswith("input_dependence")]


def test_a_forecast_that_ignores_its_input_is_found_by_the_probes_own_forward(tmp_path, traffic_files):
    cfg = config(traffic_files, max_steps=4, health={"warmup_steps": 0, "window_steps": 2})
    notices = dependence_notices(InputBlind(), cfg, tmp_path / "blind")
    assert len(notices) == 1, notices
    assert notices[0].startswith("input_dependence: the model's output hardly depends on its input")
    # the same settings on the real model: its forecasts vary with the input
    assert dependence_notices(GmanTask(), cfg, tmp_path / "healthy") == []
