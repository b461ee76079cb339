"""`raylab models` lists GMAN's three stages with the seed's parameter counts."""

from __future__ import annotations

from typer.testing import CliRunner

from raylab.cli import app


def test_raylab_models_shows_the_three_gman_counts():
    result = CliRunner().invoke(app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "gman" in line]
    assert len(rows) == 3, result.output
    for stage, count in (("quick", "30,993"), ("medium", "187,885"), ("full", "900,801")):
        assert any(stage in row and count in row for row in rows), (stage, rows)
