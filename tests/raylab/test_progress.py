"""The driver's display when output is a log (CI, job logs): plain lines, notices, no flood."""

from io import StringIO

import pytest
from rich.console import Console

from raylab.progress import LiveProgress


class FakeClock:
    """A monotonic clock whose origin the test chooses (a machine booted `start` seconds ago)."""

    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


def run_updates(clock: FakeClock) -> list[str]:
    buffer = StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with LiveProgress("tinyimagenet quick", console=console, log_every_s=10, clock=clock) as live:
        live({"global_step": 1, "total_steps": 90, "epoch": 0, "max_epochs": 3, "train_loss": 2.3})
        clock.now += 1
        live({"global_step": 2, "total_steps": 90, "epoch": 0, "max_epochs": 3, "train_loss": 2.2})  # throttled
        clock.now += 1
        live({"global_step": 30, "total_steps": 90, "epoch": 1, "max_epochs": 3, "val_accuracy": 0.5,
              "last_checkpoint": "checkpoint_epoch0001_batch000000_step00000030"})
        clock.now += 1
        live({"notice": "resuming a 2-worker checkpoint with 1 worker(s)"})
        clock.now += 3
        live({"global_step": 40, "total_steps": 90, "epoch": 1, "max_epochs": 3, "train_loss": 1.9})  # throttled: 4 s after the last line
        clock.now += 7
        live({"global_step": 50, "total_steps": 90, "epoch": 1, "max_epochs": 3, "train_loss": 1.7})  # 11 s after: printed
    return buffer.getvalue().splitlines()


# 0.0 and 5.0: a clock that starts near zero (a machine booted seconds ago, as on fresh CI
# containers); 1e6: a machine that has been up for days.
@pytest.mark.parametrize("clock_start", [0.0, 5.0, 1e6])
def test_log_mode_prints_first_update_evaluations_and_notices_but_throttles_steps(clock_start):
    lines = run_updates(FakeClock(clock_start))
    text = "\n".join(lines)
    assert lines[0] == "tinyimagenet quick: starting"
    assert lines[1].startswith("tinyimagenet quick: step 1/90  epoch 0/3  loss=2.3")
    assert "step 2/90" not in text and "step 40/90" not in text
    assert "step 30/90" in lines[2] and "val_accuracy=0.5" in lines[2] and "loss=2.2" in lines[2]
    assert "last checkpoint checkpoint_epoch0001_batch000000_step00000030" in lines[2]
    assert lines[3] == "note: resuming a 2-worker checkpoint with 1 worker(s)"
    assert "step 50/90" in lines[4] and "loss=1.7" in lines[4]
    assert len(lines) == 5


def test_log_mode_with_the_real_clock_prints_the_first_update():
    buffer = StringIO()
    with LiveProgress("t", console=Console(file=buffer, force_terminal=False, width=200), log_every_s=1e9) as live:
        live({"global_step": 1, "total_steps": 2})
    assert "t: step 1/2" in buffer.getvalue()
