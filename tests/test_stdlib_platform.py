"""platform/ is a source folder, not a package: Python's `platform` module must still win."""

import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_platform_folder_does_not_hide_stdlib_module():
    assert not (REPO / "platform" / "__init__.py").exists()
    code = "import platform, torch, ray; print(platform.system(), platform.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    system, path = proc.stdout.split()
    assert system == platform.system()
    assert "site-packages" not in path and str(REPO / "platform") not in path
