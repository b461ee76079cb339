"""`raylab sample` / raylab.sampling on checkpoints of short real `--workers 0` runs:
the JSON it writes, labels by name or index, EMA weights, errors a user can
cause (exit 2, one sentence), S3 checkpoints, and a model other than DiT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raylab.cli import app
from raylab.config import LaunchConfig
from raylab.launch import train
from raylab.sampling import load_checkpoint, registry_name, sample_checkpoint
from raylab.task import SampleOptions

runner = CliRunner()

TINY_DIT = {"architecture": "custom", "depth": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 2, "image_size": 8,
            "channels": 1, "synthetic_classes": 3, "synthetic_per_class": 10, "per_worker_batch_size": 8, "max_epochs": 2,
            "sampling_steps": 3, "label_accuracy_samples": 6, "num_samples": 2, "lr": 1e-3, "ema_decay": 0.5}


def _latest(run: Path) -> Path:
    return sorted(run.glob("checkpoint_*"))[-1]


@pytest.fixture(scope="module")
def dit_checkpoint(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("runs")
    train("dit", "quick", TINY_DIT, LaunchConfig(num_workers=0, storage_path=str(storage), name="tiny-dit"))
    return _latest(storage / "tiny-dit")


def _sample(*args: str):
    result = runner.invoke(app, ["sample", *args])
    return result, " ".join(result.output.split())


def test_sample_writes_labelled_samples_in_the_training_range_and_a_png(dit_checkpoint, tmp_path):
    out = tmp_path / "out" / "s.json"
    result, text = _sample(str(dit_checkpoint), "--n", "5", "--out", str(out))
    assert result.exit_code == 0, text
    payload = json.loads(out.read_text())
    assert payload["checkpoint"] == str(dit_checkpoint) and payload["model"] == "dit"
    assert payload["weights"] == "ema.safetensors"  # the run kept EMA weights (ema_decay 0.5)
    assert [s["label"] for s in payload["samples"]] == [{"index": i % 3, "name": f"class_{i % 3}"} for i in range(5)]
    for s in payload["samples"]:
        data = s["data"]
        assert (len(data), len(data[0]), len(data[0][0])) == (1, 8, 8)  # channels x height x width
        assert 0.0 <= min(min(min(r) for r in c) for c in data) and max(max(max(r) for r in c) for c in data) <= 1.0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["metrics"] == {}  # DiT samples without reading data: no class templates, no accuracy


def test_label_by_name_or_index_gives_the_same_samples(dit_checkpoint, tmp_path):
    by_name, by_index = tmp_path / "name.json", tmp_path / "index.json"
    for label, out in (("class_1", by_name), ("1", by_index)):
        result, text = _sample(str(dit_checkpoint), "--n", "3", "--label", label, "--guidance", "2", "--steps", "4",
                               "--seed", "9", "--out", str(out))
        assert result.exit_code == 0, text
    a, b = json.loads(by_name.read_text()), json.loads(by_index.read_text())
    assert a["samples"] == b["samples"]
    assert {s["label"]["index"] for s in a["samples"]} == {1}
    assert a["samples"][0]["guidance"] == 2.0 and a["samples"][0]["steps"] == 4 and a["samples"][0]["seed"] == 9


def test_the_ema_weights_are_the_ones_loaded_and_sampled(dit_checkpoint):
    import safetensors.torch
    import torch

    loaded = load_checkpoint(dit_checkpoint)
    assert loaded.weights == "ema.safetensors" and not loaded.model.training
    state = loaded.model.state_dict()
    ema = safetensors.torch.load_file(str(dit_checkpoint / "ema.safetensors"))
    live = safetensors.torch.load_file(str(dit_checkpoint / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in ema.items())
    assert any(not torch.equal(state[k], v) for k, v in live.items())  # decay 0.5: EMA differs from the live weights
    with torch.no_grad():
        direct = loaded.task.sample(loaded.model, 2, loaded.ctx, SampleOptions(seed=3)).samples
    assert sample_checkpoint(dit_checkpoint, n=2, seed=3).payload["samples"] == direct


def test_a_run_folder_means_its_newest_checkpoint(dit_checkpoint, tmp_path):
    assert len(list(dit_checkpoint.parent.glob("checkpoint_*"))) == 2
    result, text = _sample(str(dit_checkpoint.parent), "--n", "1", "--out", str(tmp_path / "run.json"))
    assert result.exit_code == 0, text
    payload = json.loads((tmp_path / "run.json").read_text())
    assert payload["step"] == 6 and payload["checkpoint_folder"] == dit_checkpoint.name  # 27 images / 8 = 3 steps x 2 epochs


def test_bad_label_exits_2_naming_the_valid_ones(dit_checkpoint, tmp_path):
    result, text = _sample(str(dit_checkpoint), "--label", "zebra", "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2
    assert "label 'zebra' is not a class" in text and "class_0, class_1, class_2" in text and "Traceback" not in text
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(("args", "message"), [(["--n", "0"], "--n must be at least 1"),
                                               (["--steps", "5000"], "steps 5000 must be between 1 and diffusion_steps")])
def test_bad_options_exit_2(dit_checkpoint, tmp_path, args, message):
    result, text = _sample(str(dit_checkpoint), *args, "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2 and message in text


def test_missing_or_corrupted_checkpoint_exits_2(dit_checkpoint, tmp_path):
    result, text = _sample(str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "does not exist" in text
    result, text = _sample(str(dit_checkpoint / "state.json"))
    assert result.exit_code == 2 and "is a file, not a checkpoint folder" in text
    result, text = _sample(str(tmp_path))
    assert result.exit_code == 2 and "not a raylab checkpoint" in text
    broken = tmp_path / "broken"
    shutil.copytree(dit_checkpoint, broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    result, text = _sample(str(broken), "--out", str(tmp_path / "x.json"))
    assert result.exit_code == 2 and "does not match its checksum" in text


def test_sampling_a_checkpoint_in_s3(dit_checkpoint, s3, tmp_path):
    client = s3.client()
    for path in dit_checkpoint.iterdir():
        client.upload_file(str(path), s3.bucket, f"sampling/{dit_checkpoint.name}/{path.name}")
    uri = s3.uri(f"sampling/{dit_checkpoint.name}")
    result, text = _sample(uri, "--n", "2", "--seed", "3", "--out", str(tmp_path / "s3.json"))
    assert result.exit_code == 0, text
    local = sample_checkpoint(dit_checkpoint, n=2, seed=3).payload["samples"]
    assert json.loads((tmp_path / "s3.json").read_text())["samples"] == local
    result, text = _sample(s3.uri("sampling/no-such-checkpoint"))
    assert result.exit_code == 2 and "does not exist" in text


def test_a_classifier_checkpoint_samples_its_predictions(tiny, tmp_path):
    train("tinyimagenet", "quick", tiny(max_epochs=1), LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="cls"))
    out = tmp_path / "pred.json"
    result, text = _sample(str(_latest(tmp_path / "cls")), "--n", "3", "--out", str(out))
    assert result.exit_code == 0, text
    payload = json.loads(out.read_text())
    assert payload["model"] == "tinyimagenet" and payload["weights"] == "model.safetensors"
    assert len(payload["samples"]) == 3 and {"label", "top3"} <= set(payload["samples"][0])
    assert not out.with_suffix(".png").exists()


def test_registry_name_reads_names_and_older_module_paths():
    assert registry_name("dit") == "dit"
    assert registry_name("models.dit.task") == "dit"
    with pytest.raises(Exception, match="not registered"):
        registry_name("models.nothing.task")


def test_real_image_folder_class_names_travel_with_the_checkpoint(tmp_path):
    from PIL import Image

    data = tmp_path / "pets"
    for name, value in (("cat", 30), ("dog", 220)):
        (data / name).mkdir(parents=True)
        for k in range(10):
            Image.new("L", (12, 12), value + k).save(data / name / f"{k}.png")
    overrides = {**TINY_DIT, "data_dir": str(data), "max_epochs": 1, "ema_decay": None}
    train("dit", "quick", overrides, LaunchConfig(num_workers=0, storage_path=str(tmp_path / "runs"), name="pets"))
    shutil.rmtree(data)  # sampling needs the checkpoint only, not the images
    out = tmp_path / "dog.json"
    result, text = _sample(str(tmp_path / "runs" / "pets"), "--n", "2", "--label", "dog", "--out", str(out))
    assert result.exit_code == 0, text
    payload = json.loads(out.read_text())
    assert payload["weights"] == "model.safetensors"
    assert [s["label"] for s in payload["samples"]] == [{"index": 1, "name": "dog"}] * 2
    result, text = _sample(str(tmp_path / "runs" / "pets"), "--label", "class_1")
    assert result.exit_code == 2 and "cat, dog" in text
