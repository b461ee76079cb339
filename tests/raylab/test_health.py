"""Training health checks: each seed bug planted in a real (tiny) run and caught by name.

The tasks here are the TinyImageNet task with one thing broken, or a test-only
task (a keypoint classifier reading real .npy files, a deep plain CNN); the
loop takes any task object. Runs use the shared 4-class synthetic folder
(`tiny` fixture): 96 training images, batch 8 = 12 steps an epoch.
"""

from __future__ import annotations

import json
import math
import pickle
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from models.tinyimagenet.model import build_model
from models.tinyimagenet.task import TinyImageNetTask
from raylab.cli import app
from raylab.config import ConfigError, parse_overrides, resolve_config
from raylab.health import ArrayProbe, HealthCheckFailed, HealthLog, HealthMonitor, TaskFacts
from raylab.health_config import CHECKS, HealthConfig, Policy
from raylab.health_trends import WindowStats, trend_findings
from raylab.loop_core import Position, TrainingRun
from raylab.session import LocalSession
from raylab.task import TaskContext, TorchParts
from raylab.torch_loop import TorchStepper, train_torch

FAST = {"warmup_steps": 12, "window_steps": 12}  # verdicts from the second epoch on


def run(task, cfg_values: dict, folder: Path, updates: list | None = None) -> TrainingRun:
    """Train `task` in-process; returns the TrainingRun, whose health monitor holds the findings."""
    cfg = task.config_cls.model_validate(cfg_values)
    session = LocalSession(folder, keep_checkpoints=1, on_progress=updates.append if updates is not None else None)
    training = TrainingRun(TorchStepper(task, cfg, session), cfg, session, "test", ("loss", "accuracy"), {})
    training.run()
    return training


def run_until_stopped(task, cfg_values: dict, folder: Path) -> HealthCheckFailed:
    cfg = task.config_cls.model_validate(cfg_values)
    with pytest.raises(HealthCheckFailed) as caught:
        train_torch(task, cfg, LocalSession(folder, keep_checkpoints=1))
    return caught.value


def checks(training: TrainingRun) -> dict[str, str]:
    return {f.check: f.message for f in training.health.findings}


# -- the config section ---------------------------------------------------------------------

def test_health_policies_come_from_dotted_set_keys_and_yaml_and_merge(tmp_path):
    assert parse_overrides(["health.labels=stop", "lr=0.1", "health.window_steps=20"]) == {
        "health": {"labels": "stop", "window_steps": 20}, "lr": 0.1}
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("model: tinyimagenet\ndefaults: {health: {loss_flat: stop, warmup_steps: 7}}\n"
                          "stages:\n  quick: {health: {window_steps: 9}}\n")
    cfg = resolve_config(TinyImageNetTask.config_cls, experiment, "quick", parse_overrides(["health.labels=off"]))
    assert (cfg.health.loss_flat, cfg.health.warmup_steps, cfg.health.window_steps, cfg.health.labels) == ("stop", 7, 9, "off")
    assert cfg.health.nonfinite_grads == "stop" and cfg.health.train_mode == "warn"  # defaults kept
    with pytest.raises(ConfigError, match=r"field 'health.labels' .*'warn', 'stop' or 'off'.*'sometimes'"):
        resolve_config(TinyImageNetTask.config_cls, experiment, "quick", parse_overrides(["health.labels=sometimes"]))
    with pytest.raises(ConfigError, match="unknown field 'health.label'"):
        resolve_config(TinyImageNetTask.config_cls, experiment, "quick", parse_overrides(["health.label=off"]))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["health.=off"])
    assert all(f.description for f in HealthConfig.model_fields.values())
    assert [n for n, f in HealthConfig.model_fields.items() if f.annotation is Policy] == list(CHECKS)  # a policy per check


# -- the trend verdicts on numbers ------------------------------------------------------------

def window(end: int, losses, lr=1e-3, accuracy=None, samples=400.0, dependence=None) -> WindowStats:
    losses = np.asarray(losses, dtype=float)
    return WindowStats(end, losses, np.full(len(losses), lr), samples, accuracy, dependence)


def verdicts(windows, num_classes=None, peak_lr=1e-3, **health) -> set[str]:
    return {check for check, _ in trend_findings(windows, HealthConfig(warmup_steps=10, window_steps=10, **health), num_classes, peak_lr)}


def test_trend_verdicts_read_curves_like_seed_001():
    rng = np.random.default_rng(0)
    noisy = lambda level: level * (1 + 0.2 * rng.standard_normal(10))  # noqa: E731 - a healthy minibatch curve
    healthy = [window(10, noisy(2.3)), window(20, noisy(1.5)), window(30, noisy(1.0))]
    assert verdicts(healthy, num_classes=10) == set()
    assert verdicts([window(10, noisy(2.3))]) == set()  # inside the warm-up: no verdict
    assert verdicts([window(10, noisy(2.3)), window(20, np.full(10, 1.7) + 1e-4 * rng.standard_normal(10))]) == {"loss_flat"}
    assert verdicts([window(10, noisy(2.3)), window(20, noisy(1.0)), window(30, noisy(3.0))]) == {"loss_diverging"}
    swinging = np.array([0.3, 4.5, 0.5, 4.0, 1.0, 5.0, 0.8, 3.6, 1.2, 4.2])  # around the starting level, no progress
    assert verdicts([window(10, noisy(2.3)), window(20, swinging)]) == {"loss_oscillating"}
    assert verdicts([window(10, noisy(2.3)), window(20, swinging * 3)]) == {"loss_oscillating", "loss_diverging"}
    # lr at 1% of its peak for a whole window while the loss still drops 10%: decayed too early
    assert verdicts([window(10, noisy(2.0)), window(20, np.linspace(1.0, 0.8, 10), lr=1e-5)]) == {"lr_floor"}
    assert verdicts([window(10, noisy(2.0)), window(20, np.linspace(1.0, 0.8, 10), lr=1e-4)]) == set()  # 10% of peak: not a floor


def test_chance_and_input_dependence_verdicts():
    ln10 = math.log(10)
    at_chance = [window(10, [2.4] * 10, accuracy=0.1), window(20, ln10 + 0.01 * np.sin(np.arange(10)), accuracy=0.11),
                 window(30, ln10 + 0.01 * np.cos(np.arange(10)), accuracy=0.1, dependence=2e-7)]
    assert verdicts(at_chance, num_classes=10) >= {"chance_accuracy", "chance_loss", "input_dependence"}
    learning = [window(10, [2.4] * 10, accuracy=0.1), window(20, np.linspace(2.0, 1.5, 10), accuracy=0.35),
                window(30, np.linspace(1.5, 1.2, 10), accuracy=0.5, dependence=0.3)]
    assert verdicts(learning, num_classes=10) == set()
    assert verdicts(at_chance, num_classes=10, chance_accuracy="off", chance_loss="off", input_dependence="off",
                    loss_flat="off") == set()
    # 16 samples of 4 classes cannot tell guessing (25%) from 50%: no verdict either way.
    def falling(samples: float, accuracy: float) -> list:
        return [window(end, np.linspace(2.0 - end / 20, 1.95 - end / 20, 10), accuracy=accuracy, samples=samples) for end in (10, 20, 30)]

    assert verdicts(falling(16, 0.5), num_classes=4) == set()
    assert verdicts(falling(400, 0.3), num_classes=4) == {"chance_accuracy"}  # 0.3 <= 0.25 + 3 x 0.022


# -- two workers agree: a rank-local stop stops both, rank 0 records what the other found -----------

class TwoWorkers:
    """Collectives between two threads, as TaskContext offers them (all-gather, all-reduce of sums)."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots: list = [None, None]

    def ctx(self, rank: int) -> TaskContext:
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        def reduce(values):
            parts = gather(values)
            return {k: sum(p[k] for p in parts) for k in values}
        return TaskContext(rank, 2, 0, "cpu", reduce, gather)


def two_worker_steps(policy: str, bad_rank: int, bad_step: int, steps: int = 4) -> list:
    """Both workers take `steps` steps; one sees a NaN sample at `bad_step`. Returns (outcome, monitor) per rank."""
    world, results = TwoWorkers(), [None, None]

    def worker(rank: int) -> None:
        cfg = HealthConfig(nonfinite_batch=policy, warmup_steps=100, window_steps=2)
        monitor = HealthMonitor(cfg, world.ctx(rank), ArrayProbe(), TaskFacts(describe_sample=lambda i: f"clip_{i}.npy"), HealthLog(None))
        pos = Position()
        try:
            for step in range(steps):
                batch = np.ones((2, 3), dtype=np.float32)
                if rank == bad_rank and step == bad_step:
                    batch[1, 2] = np.nan
                monitor.before_micro_batch((batch, np.zeros(2)), [10 * rank + 2 * step, 10 * rank + 2 * step + 1], pos)
                monitor.after_micro_batch({"loss": 1.0}, True, pos)
                pos.global_step, pos.batch_in_epoch = pos.global_step + 1, pos.batch_in_epoch + 1
                monitor.after_optimizer_step(pos, 0.1)
            results[rank] = ("finished", monitor)
        except HealthCheckFailed as exc:
            results[rank] = (f"stopped at step {pos.global_step}: {exc.finding.message}", monitor)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_a_stop_seen_by_one_worker_stops_every_worker_at_the_same_step():
    outcomes = [outcome for outcome, _ in two_worker_steps("stop", bad_rank=1, bad_step=2)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("stopped at step 2: NaN or inf in batch[0]")
    assert "clip_15.npy" in outcomes[0]  # rank 1's sample, named on rank 0 too


def test_a_warning_on_another_worker_reaches_rank_0_at_the_window_end():
    (first, rank0), (second, rank1) = two_worker_steps("warn", bad_rank=1, bad_step=0)
    assert first == second == "finished"
    assert [f.check for f in rank1.findings] == ["nonfinite_batch"]
    assert [f.message for f in rank0.findings] == [rank1.findings[0].message + " (worker 1)"]
    assert "clip_11.npy" in rank0.findings[0].message


# -- seed bugs planted in real runs -------------------------------------------------------------

class EvalModeLoss(TinyImageNetTask):
    """Seed 003's suspect: model.eval() left on during training (here: called in loss)."""

    def loss(self, model, batch):
        model.eval()
        return super().loss(model, batch)


def test_eval_mode_in_training_is_found_once_and_recorded_everywhere(tmp_path, tiny):
    updates: list[dict] = []
    training = run(EvalModeLoss(), tiny(max_epochs=2, eval_every_steps=6), tmp_path / "run", updates)
    assert "eval mode during the train step at step 1" in checks(training)["train_mode"]
    notices = [u["health_notice"] for u in updates if "health_notice" in u]
    assert len(notices) == 1 and notices[0].startswith("train_mode: ") and "model.eval()" in notices[0]
    saved = json.loads((tmp_path / "run" / "health.json").read_text())["findings"]
    assert [(f["check"], f["step"], f["policy"]) for f in saved] == [("train_mode", 0, "warn")] and saved[0]["advice"]
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert metrics["health"].str.startswith("train_mode:").tolist() == [True, False, False, False]  # steps 6, 12, 18, 24
    # The healthy task: no finding, an empty health column, no health.json.
    clean = run(TinyImageNetTask(), tiny(max_epochs=1), tmp_path / "clean")
    assert clean.health.findings == [] and not (tmp_path / "clean" / "health.json").exists()
    assert pd.read_parquet(tmp_path / "clean" / "metrics.parquet")["health"].tolist() == [""]


def test_eval_mode_with_stop_ends_the_run_and_the_cli_exits_1(tmp_path, tiny):
    stopped = run_until_stopped(EvalModeLoss(), tiny(health={"train_mode": "stop"}), tmp_path / "stop")
    assert stopped.finding.check == "train_mode" and "health.train_mode=warn" in str(stopped)
    assert str(pickle.loads(pickle.dumps(stopped))) == str(stopped)  # Ray ships a worker's error pickled
    # The CLI: a registered model, a check forced to fire (any spread counts as flat), policy stop -> exit 1 with the message.
    result = CliRunner().invoke(app, [
        "train", "tinyimagenet", "--workers", "0", "--storage", str(tmp_path / "cli"), "--name", "flat",
        "--set", f"data_dir={tiny()['data_dir']}", "--set", "family=baseline", "--set", "width=4", "--set", "image_size=16",
        "--set", "per_worker_batch_size=8", "--set", "num_samples=0", "--set", "health.loss_flat=stop",
        "--set", "health.flat_tolerance=1000", "--set", "health.warmup_steps=2", "--set", "health.window_steps=2"])
    assert result.exit_code == 1, result.output
    assert "health check loss_flat at step 4" in result.output and "raise lr or shrink the model" in result.output


def _no_grad_model(model: nn.Module) -> nn.Module:
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            stem = next(iter(self.inner.children()))
            with torch.no_grad():
                x = stem(x)
            for child in list(self.inner.children())[1:]:
                x = child(x)
            return x
    return Detached()


class FrozenStem(TinyImageNetTask):
    """A frozen-by-accident stem: it runs without autograd, so it can never learn (seed 002's frozen encoder)."""

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        parts.model = _no_grad_model(parts.model)
        return parts


def test_a_detached_block_is_named_as_getting_no_gradient(tmp_path, tiny):
    training = run(FrozenStem(), tiny(max_epochs=1), tmp_path / "frozen")
    message = checks(training)["no_grad"]
    assert "got no gradient at step 1" in message and "inner.features.0.0.weight" in message


class NaNKeypoints:
    """A pose classifier on real .npy keypoint files; the seed-002 normalisation divides by the
    keypoints' range, which is 0 (-> NaN) for a clip whose keypoints are all zero."""

    config_cls = TinyImageNetTask.config_cls
    headline_metrics = ("loss", "accuracy")
    num_classes = 2

    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.npy"))

    def describe_sample(self, index: int) -> str:
        return self.files[index].name

    def class_labels(self, batch):
        return batch[1]

    def build(self, cfg, ctx):
        def load(i):
            kp = torch.from_numpy(np.load(self.files[i]))
            kp = (kp - kp.min()) / (kp.max() - kp.min())  # the unguarded crop_scale
            return kp.flatten(), int(self.files[i].stem.endswith("b"))
        torch.manual_seed(cfg.seed)
        model = nn.Sequential(nn.Linear(16 * 2, 8), nn.ReLU(), nn.Linear(8, 2))
        data = [load(i) for i in range(len(self.files))]
        return TorchParts(model, torch.optim.Adam(model.parameters(), lr=cfg.lr), data)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}

    def evaluate(self, model, ctx):
        return {}

    def sample(self, model, n, ctx, options=None):
        return []


def test_nan_keypoints_are_found_before_the_loss_with_their_files_named(tmp_path, tiny):
    folder = tmp_path / "poses"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        clip = rng.normal(size=(16, 2)).astype(np.float32)
        if i in (5, 11):
            clip[:] = 0  # a clip where the pose detector saw nobody
        np.save(folder / f"clip_{i:02d}{'ab'[i % 2]}.npy", clip)
    task = NaNKeypoints(folder)
    cfg = {"max_epochs": 1, "per_worker_batch_size": 16, "num_samples": 0, "health": {"nonfinite_batch": "stop"}}
    stopped = run_until_stopped(task, cfg, tmp_path / "run")
    assert stopped.finding.check == "nonfinite_batch"
    assert "training sample(s) clip_11b.npy, clip_05b.npy" in str(stopped) or "clip_05b.npy, clip_11b.npy" in str(stopped)
    assert "batch[0]" in str(stopped) and "step 0" in str(stopped)


class TooFewClasses(TinyImageNetTask):
    """Seed 003's num_classes bug: a model (and the task's belief) of 2 classes on 4-class data."""

    believed = 2

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        torch.manual_seed(cfg.seed)
        parts.model = build_model(cfg.family, 2, cfg.width)
        parts.optimizer = torch.optim.Adam(parts.model.parameters(), lr=cfg.lr)
        return parts

    @property
    def num_classes(self) -> int:
        return self.believed if self.believed else self.index.num_classes


class TooFewOutputs(TooFewClasses):
    believed = 0  # the task knows the data's 4 classes; the model was built for 2


def test_labels_past_num_classes_and_a_model_built_for_too_few_classes_stop_before_the_loss(tmp_path, tiny):
    stopped = run_until_stopped(TooFewClasses(), tiny(), tmp_path / "labels")
    assert stopped.finding.check == "labels"
    assert "label value(s) 2, 3 outside [0, 2) (num_classes 2)" in str(stopped) and ".JPEG" in str(stopped)
    stopped = run_until_stopped(TooFewOutputs(), tiny(), tmp_path / "width")
    assert stopped.finding.check == "num_classes"
    assert "outputs 2 scores per sample but the task's data has num_classes 4" in str(stopped)


class ReusedOptimizer(TinyImageNetTask):
    """Seed 003's suspect: an optimizer created once and reused for the next model."""

    previous: torch.optim.Optimizer | None = None

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        if ReusedOptimizer.previous is None:
            ReusedOptimizer.previous = parts.optimizer
        parts.optimizer = ReusedOptimizer.previous
        return parts


def test_an_optimizer_built_for_another_model_stops_the_run(tmp_path, tiny):
    ReusedOptimizer.previous = None
    ReusedOptimizer().build(TinyImageNetTask.config_cls.model_validate(tiny()), TaskContext())  # the first model
    stopped = run_until_stopped(ReusedOptimizer(), tiny(), tmp_path / "reused")
    assert stopped.finding.check == "optimizer_foreign"
    assert "not this model's parameters" in str(stopped) and "built for another model" in str(stopped)


@pytest.fixture(scope="module")
def classes200(tmp_path_factory) -> Path:
    """A 200-class synthetic TinyImageNet folder (2 training images a class), as in seed 003."""
    from models.tinyimagenet.data import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("c200") / "tiny200", num_classes=200, train_per_class=2, val_per_class=1,
                           seed=2, image_size=16)


class PlainDeepCNN(TinyImageNetTask):
    """Seed 003's plain CNN made 16 layers deep: conv + ReLU, no batch norm, PyTorch's default init."""

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        torch.manual_seed(cfg.seed)
        layers, channels = [], 3
        for i in range(16):
            layers += [nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU()]
            channels = 8
            if i in (4, 8, 12):
                layers.append(nn.MaxPool2d(2))
        parts.model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, self.index.num_classes))
        parts.optimizer = torch.optim.Adam(parts.model.parameters(), lr=cfg.lr)
        return parts


def test_a_deep_plain_cnn_at_default_init_is_input_independent_and_at_chance(tmp_path, classes200):
    values = {"data_dir": str(classes200), "image_size": 16, "width": 4, "per_worker_batch_size": 16, "max_epochs": 2,
              "num_samples": 0, "eval_batch_size": 64, "lr": 1e-3, "health": {"warmup_steps": 10, "window_steps": 10}}
    found = checks(run(PlainDeepCNN(), values, tmp_path / "plain"))
    assert "input_dependence" in found and "e-0" in found["input_dependence"]
    assert "within 3 sigma of chance (1/200 = 0.50%)" in found["chance_accuracy"]
    assert "pinned at ln(200) = 5.2983" in found["chance_loss"]
    # The same data through a batch-norm ResNet: the output depends on the input.
    healthy = checks(run(TinyImageNetTask(), {**values, "family": "residual", "max_epochs": 1}, tmp_path / "resnet"))
    assert "input_dependence" not in healthy and "chance_loss" not in healthy


class FastDecay(TinyImageNetTask):
    """Seed 001's schedule: decay x0.1 every epoch down to a floor of 1% of the peak, reached at epoch 2."""

    def build(self, cfg, ctx):
        parts = super().build(cfg, ctx)
        steps_per_epoch = 12
        parts.make_scheduler = lambda opt, total: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: max(0.1 ** (step // steps_per_epoch), 0.01))
        return parts


@pytest.fixture(scope="module")
def steady(tmp_path_factory, tiny_data) -> dict[str, str]:
    """The findings of a healthy 3-epoch run at a constant lr of 0.1 (Adam, batch norm): the control."""
    values = {"data_dir": str(tiny_data), "family": "baseline", "width": 4, "image_size": 16, "per_worker_batch_size": 8,
              "eval_batch_size": 32, "max_epochs": 3, "lr": 0.1, "augment": False, "num_samples": 0, "health": FAST}
    return checks(run(TinyImageNetTask(), values, tmp_path_factory.mktemp("steady")))


def test_lr_at_its_floor_from_epoch_2_while_the_loss_still_falls(tmp_path, tiny, steady):
    found = checks(run(FastDecay(), tiny(max_epochs=3, lr=0.1, augment=False, num_samples=0, health=FAST), tmp_path / "decay"))
    assert "lr sat at 0.001 (1.0% of its peak 0.1) through steps 25-36" in found["lr_floor"]
    assert "still fell" in found["lr_floor"]
    assert "lr_floor" not in steady  # a constant lr has no floor to sit on


def test_lr_far_too_high_swings_the_loss(tmp_path, tiny, steady):
    found = checks(run(TinyImageNetTask(), tiny(max_epochs=2, lr=3.0, augment=False, num_samples=0, health=FAST), tmp_path / "high"))
    swings = found.get("loss_oscillating") or found.get("loss_diverging")
    assert swings is not None and "at lr 3" in swings, found
    assert not {"loss_oscillating", "loss_diverging"} & set(steady)


@pytest.mark.ray
def test_two_ray_workers_stop_together_and_rank_0_writes_the_findings(ray_session, tmp_path, tiny):
    from raylab.config import LaunchConfig
    from raylab.launch import train

    # 96 samples / 2 workers / batch 8 = 6 steps an epoch; any spread counts as flat: the window ending at step 4 stops.
    overrides = tiny(max_epochs=2, num_samples=0, health={"loss_flat": "stop", "flat_tolerance": 1000, "warmup_steps": 2,
                                                           "window_steps": 2})
    with pytest.raises(Exception, match="health check loss_flat at step 4"):
        train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=2, storage_path=str(tmp_path), name="flat"))
    saved = json.loads((tmp_path / "flat" / "health.json").read_text())["findings"]
    assert [(f["check"], f["step"], f["policy"]) for f in saved] == [("loss_flat", 4, "stop")]
