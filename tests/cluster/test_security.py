"""Secure by default beyond cluster.yaml (tests/test_cluster_yaml.py): a run name cannot
leave the storage root, and a checkpoint someone tampered with cannot run code when
loaded (nothing in raylab or the models unpickles arbitrary objects)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from raylab.checkpoint import load_torch_state, save_torch_state
from raylab.config import ConfigError
from raylab.launch import check_run_name

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["../escape", "..", "a/../../b", "/etc", "a/b", "a\\b", ".hidden", "-flag", "x" * 129, "run\x00", "~root", ""])
def test_run_names_cannot_escape_the_storage_root(name):
    with pytest.raises(ConfigError, match="must be 1-128 letters"):
        check_run_name(name)


def test_ordinary_run_names_pass():
    for name in ("tinyimagenet-quick-20260101-120000", "se_w16.lr3e-4", "A1"):
        assert check_run_name(name) == name


class _Payload:
    """Unpickling this runs code: Path(marker).touch()."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("victim", ["optimizer.pt", "scheduler.pt"])
def test_a_pickled_payload_in_a_checkpoint_never_runs(tmp_path, victim):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_torch_state(tmp_path, model, optimizer, scheduler)
    marker = tmp_path / "code-ran"
    torch.save({"state": _Payload(marker)}, tmp_path / victim)  # what an attacker with storage access could write
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        load_torch_state(tmp_path, model, optimizer, scheduler)
    assert not marker.exists()


UNSAFE = [
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
    (r"\bpickle\.loads?\(|cloudpickle\.loads?\(|joblib\.load\(|read_pickle\(", "an unrestricted unpickler"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle=True"),
]


def test_no_loader_unpickles_arbitrary_objects():
    found = []
    for path in sorted([*REPO.glob("platform/raylab/*.py"), *REPO.glob("models/**/*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            found += [f"{path.relative_to(REPO)}:{number}: {why}" for pattern, why in UNSAFE if re.search(pattern, code)]
    assert not found, "\n".join(found)
