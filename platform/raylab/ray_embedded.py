"""What raylab leaves out on the Ray instance it embeds (no cluster address).

Part of the Ray boundary (with `raylab.ray_backend`). On one machine with no
autoscaler, three things Ray Train starts for a cluster cost a run seconds and
buy nothing (bench/startup.py measures them; on 2 cores the quick stage went
from 22.5 s to 19.2 s without them, against 10 s in-process):

* Ray Train's controller asks Ray Data's autoscaling coordinator for the
  workers' resources before it starts them: a detached actor, a new Python
  process importing Ray Data, and a blocking call. On a fixed local node there
  is no autoscaler to ask. `LocalFixedScalingPolicy` is Ray's fixed policy
  without the request.
* `DatasetsCallback` starts a `DatasetManager` actor (another process) for the
  Ray Datasets passed to the trainer; raylab passes none (its loop owns the data).
* `PlacementGroupCleanerCallback` starts a detached actor that frees the workers'
  placement group if the controller dies. An embedded instance dies with the
  driver, and the cleaner finds the controller through the dashboard, which a
  `raylab train` instance does not run. Tune keeps it: there the dashboard is on
  and the cleaner frees the workers of a trial a scheduler stopped (RAY_NOTES).

At exit, `ray.shutdown` stops the raylet and the GCS, then sends the autoscaler
monitor SIGTERM; the monitor's handler reports its own death to the GCS that is
already gone and hangs until SIGKILL a second later. `shutdown_embedded` kills
the monitor first (it holds no state on a single node), then shuts Ray down.

A cluster joined with --address keeps Ray's stock controller and shutdown.
`RAYLAB_STOCK_RAY=1` keeps them on the embedded instance too (the bench's
"Ray defaults" side). The pieces reach into Ray Train's internals (pinned in
constraints.txt); if a Ray version lacks them, the stock controller runs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

STOCK_ENV = "RAYLAB_STOCK_RAY"

try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # another Ray version: the stock controller runs
    FixedScalingPolicy = None  # type: ignore[assignment,misc]


def lean_enabled() -> bool:
    return os.environ.get(STOCK_ENV, "") not in ("1", "true", "yes") and FixedScalingPolicy is not None


if FixedScalingPolicy is not None:

    class LocalFixedScalingPolicy(FixedScalingPolicy):  # type: ignore[misc,valid-type]
        """Ray's fixed-size policy without the autoscaling coordinator (no autoscaler to ask)."""

        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass


def lean_controller(trainer: Any, keep_placement_group_cleaner: bool) -> Any:
    """`trainer`, whose controller leaves out what only a cluster needs (see the module's text)."""
    if not lean_enabled() or not hasattr(trainer, "_initialize_and_run_controller"):
        return trainer
    stock = trainer._initialize_and_run_controller
    dropped = (DatasetsCallback,) if keep_placement_group_cleaner else (DatasetsCallback, PlacementGroupCleanerCallback)

    def run(**kwargs: Any) -> Any:
        kwargs["callbacks"] = [c for c in kwargs.get("callbacks", []) if not isinstance(c, dropped)]
        policy = kwargs.get("scaling_policy")
        if type(policy) is FixedScalingPolicy:
            kwargs["scaling_policy"] = LocalFixedScalingPolicy(policy.scaling_config)
        return stock(**kwargs)

    trainer._initialize_and_run_controller = run
    return trainer


def shutdown_embedded() -> None:
    """Stop the embedded Ray: the autoscaler monitor first (SIGKILL), then `ray.shutdown`."""
    import ray

    if not ray.is_initialized():
        return
    if lean_enabled():
        with contextlib.suppress(Exception):  # Ray's node object is internal: without it, a plain shutdown
            ray._private.worker._global_node.kill_monitor(check_alive=False)
    ray.shutdown()
