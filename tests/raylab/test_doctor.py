"""`raylab doctor`: the pre-flight names a broken sampler, and finds nothing wrong with any healthy
registered model (no false alarms). Runs in-process, no Ray."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from models.tinyimagenet.task import TinyImageNetTask
from raylab.cli import app
from raylab.config import ConfigError
from raylab.doctor import DoctorReport, run_doctor, verdict_table
from raylab.task import TASKS, framework_of, get_task


def table_text(report: DoctorReport) -> str:
    from rich.console import Console

    console = Console(width=220, record=True)
    console.print(verdict_table(report))
    return console.export_text()


class FixedSlotSampler(TinyImageNetTask):
    """Seed 000's sampler: its inputs are laid out for the training-time sample count (num_samples),
    so a round with any other count fails with a size mismatch."""

    def sample(self, model, n, ctx, options=None):
        images = torch.stack([self.val_data[i][0] for i in range(n)])
        slots = torch.zeros(self.cfg.num_samples, *images.shape[1:])  # sized once, for num_samples
        logits = model(images + slots[:n])
        return [{"prediction": int(i)} for i in logits.argmax(1)]


def test_doctor_names_the_sampling_path_that_breaks_for_another_sample_count(tmp_path, tiny):
    task = FixedSlotSampler()
    report = run_doctor(task, cfg=task.config_cls.model_validate(tiny(num_samples=2)), steps=6, workdir=tmp_path)
    assert report.verdict("sampling n=1").result == "ok"
    broken = report.verdict("sampling n=3")
    assert broken.result == "finding" and "task.sample(model, 3, ...) raised RuntimeError" in broken.evidence
    assert "in sample at" in broken.evidence and "test_doctor.py" in broken.evidence
    assert "any n" in broken.advice
    assert report.exit_code == 1 and report.verdict("training").result == "ok"  # the loop's own rounds use n=2
    assert "sampling n=3" in table_text(report)


def test_doctor_cli_exit_codes(tmp_path, tiny):
    runner = CliRunner()
    bad = runner.invoke(app, ["doctor", "tinyimagenet", "--set", "health.labels=sometimes"])
    assert bad.exit_code == 2 and "health.labels" in bad.output
    small = ["--set", f"data_dir={tiny()['data_dir']}", "--set", "family=baseline", "--set", "width=4", "--set", "image_size=16",
             "--set", "per_worker_batch_size=8", "--steps", "6"]
    healthy = runner.invoke(app, ["doctor", "tinyimagenet", *small])
    assert healthy.exit_code == 0, healthy.output
    assert "healthy" in healthy.output and "sampling n=3" in healthy.output
    # Any spread counts as flat: a finding, exit 1.
    flat = runner.invoke(app, ["doctor", "tinyimagenet", *small, "--steps", "12", "--set", "health.flat_tolerance=1000"])
    assert flat.exit_code == 1 and "loss_flat" in flat.output
    with pytest.raises(ConfigError, match="--steps"):
        run_doctor("tinyimagenet", steps=0)


# Small --set values keep each model's doctor short on 2 CPU cores; the model and recipe stay the stage's.
QUICK = {
    "tinyimagenet": ({}, 30),
    "translator": ({"per_worker_batch_size": 8, "synthetic_train": 240, "synthetic_val": 24, "eval_batch_size": 24}, 30),
    "craft": ({"synthetic_train_images": 48, "synthetic_val_images": 8}, 24),
    "dit": ({"synthetic_per_class": 20, "label_accuracy_samples": 10, "num_samples": 4}, 30),
    "gman": ({"synthetic_days": 7}, 30),
}


@pytest.mark.parametrize("model", sorted(TASKS))
def test_a_healthy_quick_stage_has_no_finding(model, tmp_path):
    overrides, steps = QUICK.get(model, ({}, 30))  # a model registered later gets the defaults
    report = run_doctor(model, "quick", overrides, steps=steps, workdir=tmp_path)
    assert report.exit_code == 0, table_text(report)
    assert report.verdict("training").result == "ok" and report.verdict("sampling n=3").result == "ok"
    assert report.verdict("loss_falls").result == "ok"
    # A check the framework's probe does not run is n/a with the reason, never a silent "ok".
    model_checks = ("nonfinite_grads", "train_mode", "no_grad", "frozen_changed", "optimizer_foreign", "optimizer_missing")
    results = {c: report.verdict(c).result for c in model_checks}
    if framework_of(get_task(model)) == "tensorflow":
        assert results == {"nonfinite_grads": "ok", "no_grad": "ok", "train_mode": "n/a", "frozen_changed": "n/a",
                           "optimizer_foreign": "n/a", "optimizer_missing": "n/a"}, table_text(report)
        assert "Keras layers take training=" in report.verdict("train_mode").evidence
    else:
        assert set(results.values()) == {"ok"}, table_text(report)


def test_doctor_shows_the_translators_frozen_encoder(tmp_path):
    # Seed 002's freeze_encoder=true. From scratch on the synthetic language the frozen random encoder does
    # not stop learning (residual connections carry the front end's features), so it is shown, not judged.
    overrides = {**QUICK["translator"][0], "freeze_encoder": True}
    report = run_doctor("translator", "quick", overrides, steps=2, workdir=tmp_path)
    assert "frozen: t5.encoder 66.0K" in report.verdict("parameters").evidence
    assert report.verdict("no_grad").result == "ok"  # frozen on purpose (requires_grad off) is not "no gradient"
