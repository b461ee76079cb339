"""The driver's display when output is a log (CI, job logs): plain lines, notices, no flood."""

from io import StringIO

from rich.console import Console

from raylab.progress import LiveProgress


def test_log_mode_prints_evaluations_and_notices_but_throttles_steps():
    buffer = StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with LiveProgress("tinyimagenet quick", console=console, log_every_s=3600) as live:
        live({"global_step": 1, "total_steps": 90, "epoch": 0, "max_epochs": 3, "train_loss": 2.3})
        live({"global_step": 2, "total_steps": 90, "epoch": 0, "max_epochs": 3, "train_loss": 2.2})  # throttled
        live({"global_step": 30, "total_steps": 90, "epoch": 1, "max_epochs": 3, "val_accuracy": 0.5,
              "last_checkpoint": "checkpoint_epoch0001_batch000000_step00000030"})
        live({"notice": "resuming a 2-worker checkpoint with 1 worker(s)"})
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "tinyimagenet quick: starting"
    assert lines[1].startswith("tinyimagenet quick: step 1/90  epoch 0/3  loss=2.3")
    assert "step 2/90" not in buffer.getvalue()
    assert "step 30/90" in lines[2] and "val_accuracy=0.5" in lines[2] and "loss=2.2" in lines[2]
    assert "last checkpoint checkpoint_epoch0001_batch000000_step00000030" in lines[2]
    assert lines[3] == "note: resuming a 2-worker checkpoint with 1 worker(s)"
