"""The checkpoint manager (`raylab ckpt list/info/load/clean` and `raylab.checkpoints`)
and the retention policy, on real runs made by short in-process (`--workers 0`) runs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from raylab.checkpoint_store import CheckpointRecord, scan_checkpoints
from raylab.checkpoints import checkpoint_info, clean_runs, list_checkpoints, load_checkpoint, load_weights
from raylab.cli import app
from raylab.config import ConfigError, LaunchConfig
from raylab.launch import train
from raylab.retention import RetentionPolicy, plan_retention
from raylab.task import get_task

runner = CliRunner()
LOCAL = pafs.LocalFileSystem()


def run_local(storage: Path, name: str, overrides: dict):
    return train("tinyimagenet", "quick", overrides, LaunchConfig(num_workers=0, storage_path=str(storage), name=name))


def names(storage: Path, run: str) -> list[str]:
    return sorted(p.name for p in (storage / run).glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_data):
    """A finished run with 6 checkpoints (every 4 batches, 2 epochs), each with val metrics, all kept."""
    storage = tmp_path_factory.mktemp("runs")
    overrides = {"data_dir": str(tiny_data), "family": "baseline", "width": 4, "image_size": 16, "max_epochs": 2,
                 "per_worker_batch_size": 8, "num_samples": 0, "eval_batch_size": 32,
                 "checkpoint_every_batches": 4, "eval_every_steps": 4, "keep_checkpoints": None}
    run_local(storage, "ev", overrides)
    return storage, overrides


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_list_shows_position_metrics_size_and_validity(evaluated_run):
    storage, _ = evaluated_run
    table = list_checkpoints("ev", str(storage))
    assert table["step"].tolist() == [4, 8, 12, 16, 20, 24]
    assert table["epoch"].tolist() == [0, 0, 1, 1, 1, 2] and table["batch"].tolist() == [4, 8, 0, 4, 8, 0]
    assert table["valid"].all() and table["problem"].isna().all()
    assert table["val_loss"].notna().all() and (table["size_bytes"] > 20_000).all()
    assert table.attrs["total_bytes"] == table["size_bytes"].sum()
    assert table.attrs["run"] == str(storage / "ev") and not table["in_ray_registry"].any()  # --workers 0: no Ray registry
    result = runner.invoke(app, ["ckpt", "list", "ev", "--storage", str(storage), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["checkpoint"] for r in rows] == table["checkpoint"].tolist() and all(r["valid"] for r in rows)
    result = runner.invoke(app, ["ckpt", "list", str(storage / "ev")])  # a folder works as well as a name
    assert result.exit_code == 0 and "6 checkpoint(s)" in result.output and "checkpoint_epoch0002_batch000000_step00000024" in result.output


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_info_names_a_corrupted_file_and_exits_1(evaluated_run, tmp_path, damage):
    storage, _ = evaluated_run
    run = copy_run(storage / "ev", tmp_path / "ev")
    ckpt = run / "checkpoint_epoch0001_batch000004_step00000016"
    good = runner.invoke(app, ["ckpt", "info", str(ckpt)])
    assert good.exit_code == 0, good.output
    assert "epoch 1, batch 4, step 16" in good.output and "model.safetensors" in good.output and "CORRUPTED" not in good.output
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[-10] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    info = checkpoint_info(str(ckpt))
    assert not info["valid"] and "model.safetensors" in info["problem"]
    assert {f["name"]: f["ok"] for f in info["files"]} == {"model.safetensors": False, "optimizer.pt": True, "scheduler.pt": True}
    bad = runner.invoke(app, ["ckpt", "info", str(ckpt)])
    assert bad.exit_code == 1
    message = " ".join(bad.output.split())
    assert f"checkpoint {ckpt} is corrupted: model.safetensors" in message
    assert ("truncated" if damage == "truncate" else "sha256") in message
    # list marks it too, and says why.
    table = list_checkpoints(str(run)).set_index("checkpoint")
    assert not table.loc[ckpt.name, "valid"] and "model.safetensors" in table.loc[ckpt.name, "problem"]
    assert table.drop(ckpt.name)["valid"].all()


def test_load_copies_verifies_and_loads_weights(evaluated_run, tmp_path):
    storage, _ = evaluated_run
    result = runner.invoke(app, ["ckpt", "load", "ev/checkpoint_epoch0002_batch000000_step00000024", "--storage", str(storage), "--to", str(tmp_path)])
    assert result.exit_code == 0, result.output
    dest = tmp_path / "checkpoint_epoch0002_batch000000_step00000024"
    assert "load_weights(" in result.output and str(dest) in " ".join(result.output.split())
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    # The printed recipe works: build the model from the checkpoint's config, load the weights.
    task = get_task("tinyimagenet")
    cfg = task.config_cls.model_validate(checkpoint_info(str(dest))["config"])
    from models.tinyimagenet.model import build_model

    model = build_model(cfg.family, 4, cfg.width)
    state = load_weights(str(dest), model)
    assert state["position"]["global_step"] == 24
    saved = safetensors.torch.load_file(str(dest / "model.safetensors"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    # A second load into the same place is refused; a corrupted source leaves nothing behind.
    again = runner.invoke(app, ["ckpt", "load", str(storage / "ev" / dest.name), "--to", str(tmp_path)])
    assert again.exit_code == 2 and "already exists" in again.output
    broken = copy_run(storage / "ev", tmp_path / "broken") / dest.name
    (broken / "optimizer.pt").write_bytes(b"not the optimizer")
    out = tmp_path / "out"
    failed = runner.invoke(app, ["ckpt", "load", str(broken), "--to", str(out)])
    assert failed.exit_code == 1 and "optimizer.pt" in failed.output
    assert not out.exists() or not any(out.iterdir())


def test_clean_keeps_newest_and_best_dry_run_first(evaluated_run, tmp_path):
    storage, _ = evaluated_run
    run = copy_run(storage / "ev", tmp_path / "ev")
    table = list_checkpoints(str(run))
    newest = table["checkpoint"].iloc[-1]
    # "best" by the highest val_loss, so it is surely an older checkpoint than the newest.
    worst = table.loc[table["val_loss"].idxmax(), "checkpoint"]
    assert worst != newest
    before = names(tmp_path, "ev")
    args = ["ckpt", "clean", "ev", "--storage", str(tmp_path), "--keep-latest", "1", "--keep-best", "1", "--metric", "val_loss", "--mode", "max"]
    dry = runner.invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert names(tmp_path, "ev") == before  # nothing deleted
    assert "would delete 4 checkpoint(s)" in dry.output
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert names(tmp_path, "ev") == sorted([newest, worst])
    freed = table.set_index("checkpoint").drop([newest, worst])["size_bytes"].sum()
    assert f"deleted 4 checkpoint(s) in 1 run(s); {freed / 1024:.1f} KB freed" in done.output


@pytest.mark.ray
def test_clean_across_runs_with_an_orphan_and_corrupt_folders(ray_session, evaluated_run, tmp_path):
    storage, overrides = evaluated_run
    copy_run(storage / "ev", tmp_path / "a")
    # Run b goes through Ray for one epoch, then is continued in-process: its newest folders
    # are orphans, never listed in Ray's registry. They count like any other.
    b = LaunchConfig(num_workers=1, storage_path=str(tmp_path), name="b")
    train("tinyimagenet", "quick", {**overrides, "max_epochs": 1}, b)
    train("tinyimagenet", "quick", overrides, b.model_copy(update={"num_workers": 0}))
    table = list_checkpoints("b", str(tmp_path))
    assert table["in_ray_registry"].tolist() == [True, True, True, False, False, False]
    # In run a, the newest folder is truncated and an old one lost its state.json.
    a = tmp_path / "a"
    (a / "checkpoint_epoch0002_batch000000_step00000024" / "model.safetensors").write_bytes(b"x")
    (a / "checkpoint_epoch0000_batch000004_step00000004" / "state.json").unlink()
    results = clean_runs(["a", "b"], str(tmp_path), keep_latest=2)
    # a: the invalid newest is left for a person (newer than every valid one); the two newest valid are kept.
    assert names(tmp_path, "a") == ["checkpoint_epoch0001_batch000004_step00000016", "checkpoint_epoch0001_batch000008_step00000020",
                                    "checkpoint_epoch0002_batch000000_step00000024"]
    assert names(tmp_path, "b") == ["checkpoint_epoch0001_batch000008_step00000020", "checkpoint_epoch0002_batch000000_step00000024"]
    deleted_a = {r.name for r in results[0].deleted}
    assert "checkpoint_epoch0000_batch000004_step00000004" in deleted_a  # invalid and older than the newest valid
    assert results[0].freed_bytes == sum(r.size_bytes for r in results[0].deleted) > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "../escape"], "does not exist"),
        (["list", "no-such-run"], "no-such-run does not exist"),
        (["info", "ev/../../etc", "--storage", "STORAGE"], "give the checkpoint as <run>/<checkpoint folder>"),
        (["info", "STORAGE/ev"], "is a run folder, not a checkpoint"),
        (["clean", "ev", "--keep-latest", "1", "--keep-best", "1"], "needs a metric"),
        (["clean", "ev", "--keep-latest", "1", "--keep-best", "1", "--metric", "val_los"], "--metric val_los: no checkpoint of ev reported it; they report "),
        (["clean", "ev", "--keep-latest", "1", "--mode", "avg"], "mode must be 'min' or 'max'"),
        (["clean", "ev", "--keep-latest", "-1"], "keep-latest must be 0 or more"),
    ],
)
def test_usage_mistakes_exit_2_in_one_sentence(evaluated_run, args, message):
    storage, _ = evaluated_run
    args = [a.replace("STORAGE", str(storage)) for a in args]
    before = names(storage, "ev")
    result = runner.invoke(app, ["ckpt", *args, *([] if "--storage" in args else ["--storage", str(storage)])])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert names(storage, "ev") == before


def _record(step: int, val_loss: float | None, valid: bool = True) -> CheckpointRecord:
    metrics = {"val_loss": val_loss} if val_loss is not None else {}
    name = f"checkpoint_epoch0000_batch{step:06d}_step{step:08d}"
    return CheckpointRecord(name, f"/r/{name}", f"/r/{name}", (step, 0, step), state={"metrics": metrics} if valid else None,
                            problem=None if valid else "has no state.json (an interrupted save)")


def test_retention_policy_newest_k_plus_best_b():
    records = [_record(1, 0.9), _record(2, 0.2), _record(3, None), _record(4, 0.5), _record(5, 0.7), _record(6, None, valid=False)]
    plan = plan_retention(records, RetentionPolicy(keep_latest=2, keep_best=2, metric="val_loss", mode="min"))
    kept = {r.name[-2:]: why for r, why in plan.keep}
    # newest 2 valid (4, 5) + best 2 by val_loss (2, 4) + the invalid newest left alone
    assert sorted(kept) == ["02", "04", "05", "06"], kept
    assert kept["05"] == "newest valid" and kept["02"].startswith("best #1 by val_loss")
    assert "newer than every valid checkpoint" in kept["06"]
    assert sorted(r.name[-2:] for r, _ in plan.delete) == ["01", "03"]
    # keep_latest=0 still keeps the newest valid one; None keeps everything valid.
    assert [r.name[-2:] for r, _ in plan_retention(records, RetentionPolicy(0)).keep] == ["05", "06"]
    assert not plan_retention(records, RetentionPolicy(None)).delete
    with pytest.raises(ConfigError, match="needs a metric"):
        RetentionPolicy(1, keep_best=1)


def test_train_time_retention_keeps_newest_and_best(tmp_path, tiny):
    summary = run_local(tmp_path, "tr", tiny(checkpoint_every_batches=4, eval_every_steps=4, keep_checkpoints=1,
                                           keep_best_checkpoints=1, checkpoint_metric="val_loss", checkpoint_mode="max"))
    metrics = summary.metrics.set_index("step")
    worst_step = int(metrics["val_loss"].idxmax())
    expected = {24, worst_step}
    assert {r.position[0] for r in scan_checkpoints(LOCAL, summary.run_path)} == expected
    assert len(expected) == 2


def test_keep_best_without_a_metric_is_a_config_error(tmp_path):
    result = runner.invoke(app, ["train", "tinyimagenet", "--workers", "0", "--storage", str(tmp_path), "--set", "keep_best_checkpoints=2"])
    assert result.exit_code == 2
    assert "keep_best_checkpoints (2) needs checkpoint_metric" in " ".join(result.output.split())


def test_tools_and_resume_on_s3(s3, tiny, tmp_path):
    """The same manager on an S3-compatible server (moto, loopback): paths keep s3://,
    a truncated object is named, a run resumes from the previous good checkpoint."""
    storage, run = s3.uri("ckpt-tools"), f"s3://{s3.bucket}/ckpt-tools/s3run"
    launch = LaunchConfig(num_workers=0, storage_path=storage, name="s3run")
    summary = train("tinyimagenet", "quick", tiny(max_epochs=1, checkpoint_every_batches=4, keep_checkpoints=None), launch)
    newest, previous = "checkpoint_epoch0001_batch000000_step00000012", "checkpoint_epoch0000_batch000008_step00000008"
    assert summary.run_path == run and summary.latest_checkpoint == f"{run}/{newest}"
    table = list_checkpoints("s3run", storage)
    assert table["step"].tolist() == [4, 8, 12] and table["valid"].all() and table["uri"].iloc[-1] == f"{run}/{newest}"
    key = f"ckpt-tools/s3run/{newest}/model.safetensors"
    body = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body[:1000])
    info = checkpoint_info(s3.uri(f"ckpt-tools/s3run/{newest}"))
    assert not info["valid"] and info["problem"].startswith("model.safetensors is 1,000 bytes")
    result = runner.invoke(app, ["ckpt", "info", f"s3run/{newest}", "--storage", storage])
    assert result.exit_code == 1 and f"checkpoint {run}/{newest} is corrupted: model.safetensors" in " ".join(result.output.split())
    local = load_checkpoint(f"s3run/{previous}", tmp_path, storage)
    assert (local / "model.safetensors").is_file() and (local / "state.json").is_file()
    updates: list[dict] = []
    train("tinyimagenet", "quick", tiny(max_epochs=2, checkpoint_every_batches=4, keep_checkpoints=None), launch, on_progress=updates.append)
    notices = [u["notice"] for u in updates if "notice" in u]
    assert any(n.startswith(f"skipping checkpoint {run}/{newest}: model.safetensors is 1,000 bytes") for n in notices), notices
    assert any(n.startswith(f"resuming from {run}/{previous} (epoch 0, batch 8, step 8) instead") for n in notices), notices
    dry = clean_runs(["s3run"], storage, keep_latest=1, dry_run=True)
    assert len(dry[0].plan.delete) == 5 and len(s3.keys("ckpt-tools/s3run/checkpoint_")) > 5 * 4
    clean_runs(["s3run"], storage, keep_latest=1)
    left = {k.split("/")[2] for k in s3.keys("ckpt-tools/s3run/checkpoint_")}
    assert left == {"checkpoint_epoch0002_batch000000_step00000024"}


def test_checkpoint_cost_bench_runs_in_smoke_mode(tmp_path, capsys):
    """bench/checkpoint_cost.py end to end at tiny sizes: it writes its JSON (no timing is asserted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkpoint_cost", Path(__file__).resolve().parents[2] / "bench" / "checkpoint_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--smoke", "--out", str(tmp_path / "cost.json")])
    saved = json.loads((tmp_path / "cost.json").read_text())
    assert saved["extra_checkpoints"] == 3 and len(saved["rounds"]) == 1
    assert result["median_loop_s_every"] > 0 and result["median_resume_s_early"] > 0 and result["checkpoint_size_bytes"] > 0
    assert "throughput cost of 3 extra checkpoint(s)" in capsys.readouterr().out
