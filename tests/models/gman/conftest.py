"""Small synthetic traffic files for the GMAN tests, written once per session by the real generator."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def traffic_files(tmp_path_factory) -> tuple[Path, Path]:
    """(traffic.h5, SE.txt): 6 sensors, 7 days of 5-minute rows, 64-dim SE."""
    from models.gman.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("gman") / "syn", num_sensors=6, days=7, seed=3)
