"""The benchmark runs end to end in smoke mode and writes its JSON (no timing is asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


@pytest.mark.ray
def test_train_throughput_smoke(ray_session, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    module.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["smoke"] is True and len(result["rounds"]) == 1
    for side in ("raylab", "plain"):
        assert result[f"{side}_samples_per_s"] > 0 and result[f"{side}_startup_s"] >= 0
    assert "raylab slowdown" in capsys.readouterr().out
