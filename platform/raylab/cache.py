"""Where raylab keeps generated data between runs (synthetic datasets).

`RAYLAB_CACHE_DIR` overrides the location (tests point it at a fresh temporary
folder so a run never depends on what a machine's ~/.cache already holds);
otherwise `$XDG_CACHE_HOME/raylab`, else `~/.cache/raylab`. Ray Train workers
receive the driver's `RAYLAB_*` variables (see `raylab.ray_backend`), so the
driver and every worker agree on the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RAYLAB_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """`<cache root>/<parts...>` (not created)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "raylab"
    return base.joinpath(*parts)


def raylab_environment() -> dict[str, str]:
    """The driver's RAYLAB_* variables, to be set on every worker."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAYLAB_")}
