"""The DiT task (models.dit.task) end to end on tiny data: trained with batch 8,
it samples 1, 3 or 8 samples in both data shapes with and without guidance;
rounds carry labels, data in the training range, a PNG and label accuracy;
validation loss is deterministic and shards across workers exactly."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.dit.config import DiTConfig
from models.dit.data import DataError
from models.dit.task import DiTTask
from raylab.config import ConfigError, LaunchConfig, validate_config
from raylab.task import SampleOptions, SampleOutput, TaskContext


def tiny(kind: str, **extra) -> dict:
    base = {"architecture": "custom", "depth": 1, "hidden_size": 32, "num_heads": 4, "patch_size": 2,
            "synthetic_classes": 3, "synthetic_per_class": 10, "per_worker_batch_size": 8, "max_epochs": 1,
            "sampling_steps": 3, "label_accuracy_samples": 6, "num_samples": 2, "log_every_steps": 1, "lr": 1e-3}
    shape = {"data_kind": "images", "image_size": 8, "channels": 3} if kind == "images" else {"data_kind": "tokens", "seq_len": 8}
    return {**base, **shape, **extra}


def trained(kind: str, steps: int = 3, **extra) -> tuple[DiTTask, torch.nn.Module]:
    """A task and its model after a few optimizer steps on batches of 8."""
    cfg = DiTConfig(**tiny(kind, **extra))
    torch.manual_seed(0)
    task = DiTTask()
    parts = task.build(cfg, TaskContext())
    loader = torch.utils.data.DataLoader(parts.train_data, batch_size=8, shuffle=True, drop_last=True)
    model = parts.model.train()
    batches = iter(loader)
    for _ in range(steps):
        loss, metrics = task.loss(model, next(batches))
        assert torch.isfinite(loss) and set(metrics) == {"mse", "vb"}
        loss.backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad()
    return task, model


@pytest.fixture(scope="module", params=["images", "tokens"])
def kind_and_trained(request):
    return request.param, *trained(request.param)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_trained_with_batch_8_samples_any_count(kind_and_trained, n, guidance):
    kind, task, model = kind_and_trained
    out = task.sample(model, n, TaskContext(), SampleOptions(guidance=guidance))
    assert isinstance(out, SampleOutput) and len(out.samples) == n
    expected = [3, 8, 8] if kind == "images" else [8, 8]
    for i, record in enumerate(out.samples):
        data = torch.tensor(record["data"])
        assert list(data.shape) == expected
        if kind == "images":
            assert data.min() >= 0 and data.max() <= 1  # images in [0, 1], channels x height x width
        assert record["label"] == {"index": i % 3, "name": f"class_{i % 3}"}
        assert record["guidance"] == guidance
    json.dumps(out.samples)
    assert model.training  # the sampler restored the mode it found


def test_image_rounds_have_a_png_grid_and_token_rounds_none(kind_and_trained):
    kind, task, model = kind_and_trained
    out = task.sample(model, 5, TaskContext())
    if kind == "images":
        with Image.open(io.BytesIO(out.png)) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.width >= 3 * 8
    else:
        assert out.png is None


def test_a_periodic_round_measures_label_accuracy_with_and_without_guidance(kind_and_trained):
    _, task, model = kind_and_trained
    out = task.sample(model, 2, TaskContext())
    assert set(out.metrics) == {"sample_label_accuracy", "sample_label_accuracy_guided"}
    assert all(0.0 <= v <= 1.0 for v in out.metrics.values())
    assert all("classified_as" in record for record in out.samples)


def test_label_by_index_or_name_and_bad_label_names_the_valid_ones(kind_and_trained):
    _, task, model = kind_and_trained
    by_index = task.sample(model, 3, TaskContext(), SampleOptions(label=2, seed=1))
    by_name = task.sample(model, 3, TaskContext(), SampleOptions(label="class_2", seed=1))
    assert [r["label"]["index"] for r in by_index.samples] == [2, 2, 2]
    assert [r["data"] for r in by_index.samples] == [r["data"] for r in by_name.samples]
    with pytest.raises(ConfigError, match="'cat'.*0-2.*class_0, class_1, class_2"):
        task.sample(model, 1, TaskContext(), SampleOptions(label="cat"))
    with pytest.raises(ConfigError, match="label 3"):
        task.sample(model, 1, TaskContext(), SampleOptions(label=3))


def test_same_seed_same_samples_other_seed_other_samples(kind_and_trained):
    _, task, model = kind_and_trained
    a = task.sample(model, 3, TaskContext(), SampleOptions(seed=7))
    b = task.sample(model, 3, TaskContext(), SampleOptions(seed=7))
    c = task.sample(model, 3, TaskContext(), SampleOptions(seed=8))
    assert a.samples == b.samples and a.samples != c.samples
    assert task.sample(model, 2, TaskContext()).metrics == task.sample(model, 2, TaskContext()).metrics


def test_validation_loss_is_deterministic_and_shards_exactly(kind_and_trained):
    _, task, model = kind_and_trained
    model.eval()
    with torch.no_grad():
        whole = task.evaluate(model, TaskContext())
        assert whole == task.evaluate(model, TaskContext())
        sums: dict[str, float] = {}

        def collect(values):  # what the all-reduce of two workers would add up
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            return dict(values)

        for rank in range(2):
            task.evaluate(model, TaskContext(world_rank=rank, world_size=2, all_reduce_sum=collect))
    model.train()
    assert set(whole) == {"loss", "mse", "vb"}
    n = sums.pop("count")
    assert n == len(task.val_data)
    for key, value in sums.items():
        assert value / n == pytest.approx(whole[key], rel=1e-9)


def test_build_records_class_names_and_a_trustworthy_classifier(tmp_path):
    task = DiTTask()
    parts = task.build(DiTConfig(**tiny("images", synthetic_per_class=20)), TaskContext())
    assert parts.metadata["class_names"] == ["class_0", "class_1", "class_2"]
    assert parts.metadata["sample_shape"] == [3, 8, 8] and parts.metadata["data_kind"] == "images"
    assert parts.metadata["template_val_accuracy"] >= 0.9
    trained_params = {id(p) for group in parts.optimizer.param_groups for p in group["params"]}
    assert id(parts.model.pos_embed) not in trained_params


def test_real_image_folder_classes_and_an_unreadable_file_fails_the_build(tmp_path):
    root = tmp_path / "pets"
    for name, value in (("dog", 0), ("cat", 255)):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (20, 20), (value, value, value)).save(root / name / f"{k}.jpg")
    task = DiTTask()
    cfg = DiTConfig(**tiny("images", data_dir=str(root)))
    parts = task.build(cfg, TaskContext())
    assert task.class_names == ("cat", "dog") and parts.metadata["class_names"] == ["cat", "dog"]
    assert task.num_parameters(cfg) == sum(p.numel() for p in parts.model.parameters())
    (root / "dog" / "3.jpg").write_bytes(b"truncated")
    with pytest.raises(DataError, match=r"dog/3\.jpg"):
        DiTTask().build(cfg, TaskContext())


def test_build_for_sampling_makes_the_same_model_without_data():
    task = DiTTask()
    cfg = DiTConfig(**tiny("tokens"))
    built = task.build(cfg, TaskContext()).model
    fresh = DiTTask()
    rebuilt = fresh.build_for_sampling(cfg, TaskContext(), {"class_names": ["a", "b", "c"]})
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in rebuilt.state_dict().items()}
    out = fresh.sample(rebuilt, 2, TaskContext(), SampleOptions(label="b"))
    assert [r["label"] for r in out.samples] == [{"index": 1, "name": "b"}] * 2 and out.metrics == {}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"architecture": "custom", "depth": 2}, "architecture 'custom' needs hidden_size, num_heads, patch_size"),
        ({"architecture": "DiT-S/2", "depth": 2}, "depth only apply to architecture 'custom'"),
        ({"architecture": "DiT-S/4", "image_size": 10}, "image_size 10 is not divisible by patch size 4"),
        ({"architecture": "DiT-Q/2"}, "field 'architecture' input should be"),
        ({"data_kind": "tokens", "architecture": "DiT-S/2", "seq_len": 5}, "seq_len 5 is not divisible by patch size 2"),
        ({"sampling_steps": 2000}, "sampling_steps 2000 exceeds diffusion_steps 1000"),
    ],
)
def test_config_mistakes_are_one_sentence_naming_the_field(values, message):
    with pytest.raises(ConfigError) as caught:
        validate_config(DiTConfig, values, "dit.yaml stage 'quick'")
    assert message in str(caught.value)


def test_a_run_through_the_loop_records_rounds_and_accuracy(tmp_path):
    from raylab.launch import train

    summary = train("dit", "quick", tiny("images", max_epochs=2), LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="r"))
    run = tmp_path / "r"
    rounds = sorted((run / "samples").glob("step_*.json"))
    assert rounds and rounds[0].name == "step_00000000.json"  # a round before the first step
    first = json.loads(rounds[0].read_text())
    assert len(first["samples"]) == 2 and first["samples"][0]["label"]["name"] == "class_0"
    assert (run / "samples" / "step_00000000.png").is_file()
    assert "sample_label_accuracy" in summary.metrics and "sample_label_accuracy_guided" in summary.metrics
    assert summary.metrics["val_loss"].notna().any()


def test_the_token_experiments_full_stage_is_the_seeds_32_725_648_parameter_model():
    from raylab.config import resolve_config
    from raylab.launch import repo_root

    task = DiTTask()
    path = repo_root() / "experiments" / "dit_tokens.yaml"
    full = resolve_config(DiTConfig, path, "full", {})
    assert task.num_parameters(full) == 32_725_648
    assert (full.per_worker_batch_size, full.lr, full.sample_every_steps, full.num_samples, full.sampling_steps) == (8, 1e-4, 5, 2, 10)
    assert full.synthetic_classes * full.synthetic_per_class == 100  # the seed's 100 samples
    images_full = resolve_config(DiTConfig, repo_root() / "experiments" / "dit.yaml", "full", {})
    assert images_full.architecture == "DiT-S/2" and images_full.sample_every_steps == 5


def test_mid_epoch_resume_with_ema_is_bit_identical(tmp_path):
    """The diffusion loss draws timesteps and noise every step, and label dropout: every stream,
    the EMA and the data position must come back for a resumed run to equal an uninterrupted one."""
    import safetensors.torch

    from raylab.launch import train

    values = tiny("images", synthetic_per_class=16, max_epochs=2, checkpoint_every_batches=2, ema_decay=0.9, num_samples=0)
    launch = LaunchConfig(num_workers=0, storage_path=str(tmp_path))
    whole = train("dit", "quick", values, launch.model_copy(update={"name": "whole"}))
    first = train("dit", "quick", {**values, "max_steps": 4}, launch.model_copy(update={"name": "split"}))
    assert json.loads((Path(first.latest_checkpoint) / "state.json").read_text())["position"] == {
        "epoch": 0, "batch_in_epoch": 4, "global_step": 4}  # 48 images / batch 8: mid-epoch
    resumed = train("dit", "quick", values, launch.model_copy(update={"name": "split"}))
    for file in ("model.safetensors", "ema.safetensors"):
        a = safetensors.torch.load_file(str(Path(whole.latest_checkpoint) / file))
        b = safetensors.torch.load_file(str(Path(resumed.latest_checkpoint) / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
