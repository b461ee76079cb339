"""What raylab leaves out on the Ray instance it embeds (no cluster address).

Part of the Ray boundary (with `raylab.ray_backend`). On one machine with no
autoscaler, what Ray starts for a cluster costs a run seconds and buys nothing
(bench/startup.py measures it; see the README's performance section).

`ray.init` of a `raylab train` instance (`embedded_init`) starts neither of two head
processes, the way `ray start --head --no-monitor` leaves out the first:

* the autoscaler monitor: a Python process that asks cloud providers for nodes;
  on a fixed local node there is no provider to ask;
* the API server: with `include_dashboard=False` Ray still starts the dashboard
  process with its usage-statistics module alone, and waits for it to publish
  its address before it starts the raylet (on 2 cores about a second of every
  `ray.init`). Nothing of raylab's embedded run talks to it; a Tune sweep's
  instance runs the full dashboard (the placement-group cleaner needs it).

On every embedded instance (Tune's too), the dashboard agent binds a port the OS
picks: Ray's fixed default (52365) is taken whenever another Ray instance runs on
the machine, and the agent then retries for about 3.4 s before it gives up on
it, while the raylet waits for it before the node counts as started.

Three things Ray Train's controller starts are left out as well (`lean_controller`):

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
a monitor first where one runs (a Tune sweep's instance), then shuts Ray down.

A cluster joined with --address keeps Ray's stock processes, controller and
shutdown. `RAYLAB_STOCK_RAY=1` keeps them on the embedded instance too (the
bench's "Ray defaults" side; the agent still binds a port of its own). The
pieces reach into Ray's internals (pinned in constraints.txt); if a Ray
version lacks them, Ray's stock pieces run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

STOCK_ENV = "RAYLAB_STOCK_RAY"

try:
    from ray._private.node import Node
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
except ImportError:  # another Ray version: the stock controller runs
    FixedScalingPolicy = Node = None  # type: ignore[assignment,misc]


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


@contextlib.contextmanager
def embedded_init(lean: bool) -> Iterator[None]:
    """Around `ray.init` of raylab's own instance: the dashboard agent binds a port the OS picks,
    and with `lean` (a `raylab train` instance) neither autoscaler monitor nor API server starts."""
    if Node is None or not all(hasattr(Node, m) for m in ("start_monitor", "start_api_server", "start_ray_processes")):
        yield
        return
    stock = Node.start_monitor, Node.start_api_server, Node.start_ray_processes

    def no_monitor(self: Any) -> None:
        pass

    def no_api_server(self: Any, **_: Any) -> None:
        self._webui_url = None  # what a minimal install without the dashboard leaves

    def own_agent_port(self: Any) -> None:
        self._ray_params.dashboard_agent_listen_port = 0  # Ray's "self-bind"; the node records the port it got
        stock[2](self)

    Node.start_ray_processes = own_agent_port
    if lean and lean_enabled():
        Node.start_monitor, Node.start_api_server = no_monitor, no_api_server
    try:
        yield
    finally:
        Node.start_monitor, Node.start_api_server, Node.start_ray_processes = stock


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
