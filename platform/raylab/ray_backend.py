"""The Ray boundary: the only module that imports `ray.train`.

`run_on_ray` starts (or joins) Ray, validates that the workers fit, runs the
training loop on N workers with Ray Train's TorchTrainer (DDP over gloo on
CPU, NCCL on GPU), and streams rank 0's progress to the driver through a Ray
queue so the driver can draw one live display instead of N workers' logs.

Typed configs cross the boundary as JSON data and are rebuilt on each worker
with the task's pydantic class: no string-keyed dicts past this point.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from raylab.cache import raylab_environment
from raylab.config import ConfigError, LaunchConfig, TrainConfig, missing_metric
from raylab.recovery import named_checkpoint, ray_registry_latest, reconcile_ray_registry
from raylab.retention import RetentionPolicy
from raylab.run_storage import run_filesystem
from raylab.session import RunCheckpoints

# Every run: workers keep the driver's working directory, so relative paths in a
# config (data_dir) mean the same thing on the driver and on the workers.
_RUN_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
# Only for the embedded single-machine Ray: skip helpers that matter on a real
# cluster (spot-preemption watcher, Prometheus metrics) and cost startup time on
# a laptop, and let Train V2's controller poll every 0.2 s instead of 2 s -- it
# starts the worker group, takes each report and notices the end of training on
# that tick, so each of those waited up to 2 s (bench/startup.py measures it; set
# the same variable on a cluster's nodes to get it there). A cluster joined with
# --address keeps Ray's defaults; any of these already set in the environment wins.
_EMBEDDED_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


# --- Tune (raylab.tune_backend) on the embedded Ray -------------------------------------
# A Tune trial holds one `trial_slot` instead of a CPU, so on a small machine the trials'
# own Train workers are what fill the cores (a CPU per trial actor deadlocked 2 cores).
# The dashboard stays on: without it the placement-group cleaner cannot see that a trial
# Tune stopped (ASHA) is gone, its workers' CPUs leak and the sweep hangs (RAY_NOTES).
# Concurrency is limited by the search algorithm, not by the number of slots.
TRIAL_RESOURCE = "trial_slot"
SWEEP_METRIC_ENV = "RAYLAB_SWEEP_METRIC"  # set for a trial's workers: a report lacking it stops the trial
_TUNE_EMBEDDED = {"include_dashboard": True, "resources": {TRIAL_RESOURCE: 1000}}
# Each ray.train.report waits for the controller's next poll (default every 2 s): a
# sweep reports at every evaluation, so poll faster.
_TUNE_EMBEDDED_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ResourceError(RuntimeError):
    """The requested workers cannot fit on the Ray cluster."""


def ensure_ray(launch: LaunchConfig, tune: bool = False) -> bool:
    """Connect to Ray: a cluster at --address / RAY_ADDRESS, else an embedded local one.

    Returns True when the run uses a local, fixed-size Ray (no cluster address):
    there, workers that do not fit would wait forever, so they are checked.
    `tune=True` (ladders, sweeps): the embedded instance also gets what Tune needs
    (`_TUNE_EMBEDDED`).
    """
    import ray

    from raylab.ray_failures import hide_worker_death_paragraphs

    hide_worker_death_paragraphs()  # raylab prints its own one-line account of a worker death
    for key, value in _RUN_ENV.items():
        os.environ.setdefault(key, value)
    address = launch.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        if not (tune and not address and TRIAL_RESOURCE not in ray.cluster_resources()):
            return not address
        # An embedded instance started for `train` (a notebook, a test session) lacks what
        # Tune needs, and only a restart adds it.
        ray.shutdown()
    # Workers' logs and Ray's own chatter (e.g. the placement-group cleaner's repeated
    # "Failed to query Ray Train Controller actor state") stay in Ray's log files;
    # the driver shows one display, and worker errors still arrive through fit().
    common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if address:
        try:
            ray.init(address=address, **common)
        except ConnectionError as exc:
            hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
                " If the cluster uses token authentication (raylab's cluster.yaml does), set RAY_AUTH_MODE=token"
                " and provide its token in ~/.ray/auth_token or RAY_AUTH_TOKEN."
            )
            raise ConnectionError(f"cannot connect to the Ray cluster at {address}: {exc}.{hint}") from None
        return False
    from raylab.ray_embedded import embedded_init

    for key, value in _EMBEDDED_ENV.items():
        os.environ.setdefault(key, value)
    # address="local": always a new instance of our own. With no address, ray.init would
    # join whatever cluster `ray start` last left on this machine (/tmp/ray/ray_current_cluster).
    if tune:
        for key, value in _TUNE_EMBEDDED_ENV.items():
            os.environ.setdefault(key, value)
        # Train's placement-group cleaner (what frees a stopped trial's workers) finds the
        # dashboard through the state API, which gives up when several Ray instances run on
        # one machine ("Found multiple active Ray instances"): name ours to every process.
        # Set only while Ray's processes start (they inherit it), so this process's own
        # notion of a job API (e.g. `raylab submit`'s default) is left alone.
        port = _free_port()
        before = os.environ.get("RAY_API_SERVER_ADDRESS")
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            with embedded_init(lean=False):
                ray.init(address="local", dashboard_port=port, **_TUNE_EMBEDDED, **common)
        finally:
            if before is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = before
    else:
        with embedded_init(lean=True):  # no autoscaler monitor, no API server (raylab.ray_embedded)
            ray.init(address="local", include_dashboard=False, **common)
    _shutdown_at_exit()
    return True


def _shutdown_at_exit() -> None:
    """The embedded instance stops at exit through `shutdown_embedded`, registered after
    `ray.init` (again after each restart) so it runs before Ray's own exit handler, which
    then has nothing left to do."""
    from raylab.ray_embedded import shutdown_embedded

    atexit.unregister(shutdown_embedded)
    atexit.register(shutdown_embedded)


def check_resources(launch: LaunchConfig, local: bool) -> None:
    """Fail fast, in one sentence, where Ray would wait forever for resources."""
    import ray

    total = ray.cluster_resources()
    need_cpu = launch.num_workers * launch.cpus_per_worker
    need_gpu = launch.num_workers if launch.use_gpu else 0
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if not local:
        return  # an autoscaling cluster may add the nodes it needs
    if need_cpu > have_cpu:
        raise ResourceError(
            f"--workers {launch.num_workers} x {launch.cpus_per_worker:g} CPU needs {need_cpu:g} CPUs but the local Ray "
            f"instance has {have_cpu:g}; lower --workers or --cpus-per-worker, or pass --address of a bigger cluster."
        )
    if need_gpu > have_gpu:
        raise ResourceError(f"--gpus asks for {need_gpu} GPU(s) but the local Ray instance has {have_gpu:g}.")


class RaySession:
    """The loop's Session on a Ray Train worker.

    The resume point is raylab's choice, not Ray's registry's (`raylab.recovery`):
    rank 0 picks the newest valid folder in storage and broadcasts its name, so
    every rank loads the same one. After each checkpoint, rank 0 applies the
    retention policy (Ray itself is told to keep everything; see `run_on_ray`).
    """

    def __init__(self, progress_queue: Any, retention: RetentionPolicy | None = None, device: str | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        if device is None:  # torch's view of this worker's device (TensorFlow workers pass theirs)
            import ray.train.torch

            device = str(ray.train.torch.get_device())
        self.device = device
        storage = ctx.get_storage()
        self.run_fs, self.run_path = storage.storage_filesystem, storage.experiment_fs_path
        self._queue = progress_queue
        notify = lambda text: self.progress({"notice": text})  # noqa: E731
        self.checkpoints = RunCheckpoints(self.run_fs, self.run_path, retention or RetentionPolicy(None), notify)
        self._sweep_metric = os.environ.get(SWEEP_METRIC_ENV)  # a Tune trial's ranking metric (raylab.tune_backend)
        self._test_dir = os.environ.get("RAYLAB_TEST_PID_DIR")  # lets the recovery tests kill a real worker by pid
        if self._test_dir:
            Path(self._test_dir, f"rank{self.world_rank}.pid").write_text(str(os.getpid()))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        from ray.train.collective import broadcast_from_rank_zero

        if self.world_rank != 0:
            name = broadcast_from_rank_zero(None)
            if name is None:
                yield None
                return
            with named_checkpoint(self.run_fs, self.run_path, name) as directory:
                yield directory
            return
        registry = ray_registry_latest(self.run_fs, self.run_path)
        with self.checkpoints.resume_point() as point:
            broadcast_from_rank_zero(point.name if point else None)
            if point is not None and point.name != registry and not point.skipped:
                # e.g. a driver killed between a checkpoint's upload and its registration
                self.progress({"notice": f"resuming from {point.describe()}; Ray's registry named {registry or 'no checkpoint'}"})
            yield point.directory if point else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, checkpoint_name: str | None) -> None:
        import pyarrow.fs as pafs
        import ray.train

        if checkpoint_dir is not None and checkpoint_name:
            stale = f"{self.run_path}/{checkpoint_name}"
            if self.run_fs.get_file_info(stale).type != pafs.FileType.NotFound:
                self.run_fs.delete_dir(stale)  # a corrupt folder at this position, skipped on resume
        if self._sweep_metric and self.world_rank == 0:
            problem = missing_metric(self._sweep_metric, metrics)
            if problem:
                raise ConfigError(problem)
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name)
        if checkpoint_dir is not None:
            self.checkpoints.enforce_retention()

    def progress(self, update: dict[str, Any]) -> None:
        if self._queue is None:
            return
        with contextlib.suppress(Exception):  # a display must never break training
            self._queue.put_nowait(update)
        if self._test_dir:
            _hold_for_test(Path(self._test_dir), update)


def _hold_for_test(folder: Path, update: dict[str, Any]) -> None:
    """Recovery tests only (RAYLAB_TEST_PID_DIR): when the test has created `hold`, rank 0
    stops right after announcing its first mid-epoch checkpoint, until the test creates
    `release` -- so a test kills a worker at that point whatever the machine's speed (the
    other workers wait at their next collective). Once per test: `hold` is consumed."""
    hold = folder / "hold"
    if not (hold.exists() and update.get("last_checkpoint") and update.get("batch_in_epoch", 0) > 0):
        return
    hold.unlink()
    deadline = time.monotonic() + 120  # never hang a run that the test forgot
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _train_worker(config: dict[str, Any]) -> None:
    """Entry point on every Ray Train worker."""
    from raylab.task import get_task
    from raylab.torch_loop import train_torch

    os.environ.update(config.get("env", {}))  # RAYLAB_* of the driver (cache folder, ...)
    task = get_task(config["task"])
    cfg = task.config_cls.model_validate(config["cfg"])
    train_torch(task, cfg, RaySession(config["progress_queue"], RetentionPolicy.from_config(cfg)))


# --- TensorFlow tasks (raylab.tf_loop) ---------------------------------------------------
def _train_tf_worker(config: dict[str, Any]) -> None:
    """Entry point on every TensorflowTrainer worker (TF_CONFIG is set; tf_loop builds MWMS from it)."""
    from raylab.task import get_task
    from raylab.tf_loop import train_tf

    os.environ.update(config.get("env", {}))
    task = get_task(config["task"])
    cfg = task.config_cls.model_validate(config["cfg"])
    train_tf(task, cfg, RaySession(config["progress_queue"], RetentionPolicy.from_config(cfg), device="cpu"))


def _framework_trainer(task_name: str, launch: LaunchConfig) -> tuple[Any, Callable[[dict[str, Any]], None], dict[str, str]]:
    """(trainer class, worker entry point, extra worker environment) for the task's framework."""
    from raylab.task import framework_of, get_task

    if framework_of(get_task(task_name)) != "tensorflow":
        from ray.train.torch import TorchTrainer

        return TorchTrainer, _train_worker, {}
    from raylab.tf_loop import TF_ENV

    # Read at TensorFlow's import, which happens in this driver (ray.train.tensorflow) and in
    # every worker before the train function runs: set here and in the workers' runtime env.
    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    from ray.train.tensorflow import TensorflowTrainer

    threads = os.environ.get("RAYLAB_TF_THREADS") or str(max(1, int(launch.cpus_per_worker)))
    return TensorflowTrainer, _train_tf_worker, {**TF_ENV, "RAYLAB_TF_THREADS": threads}


@dataclass
class RayRunResult:
    run_path: str
    storage_path: str
    latest_checkpoint: str | None


def first_worker_error(exc: BaseException) -> BaseException:
    """The exception a worker raised, unwrapped from Ray's TrainingFailedError."""
    from raylab.ray_failures import worker_death_error

    died = worker_death_error(exc)
    if died is not None:
        return died
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return failures[min(failures)]
    return getattr(exc, "controller_failure", exc)


def make_trainer(
    task_name: str, cfg: TrainConfig, launch: LaunchConfig, name: str, storage_path: str,
    queue: Any = None, callbacks: tuple[Any, ...] = (), embedded: bool = False, tune: bool = False,
) -> Any:
    """The Ray Train trainer of one run: the one place trainers are built (`run_on_ray`,
    and every Tune trial in `raylab.tune_backend`, which adds its report callback).

    `embedded`: the run is on raylab's own local Ray, whose controller leaves out what
    only a cluster needs (`raylab.ray_embedded`; a Tune trial's keeps the placement-group cleaner)."""
    import ray.train

    from raylab.ray_failures import FailureReporter

    fs, run_path = run_filesystem(storage_path, name)
    reconcile_ray_registry(fs, run_path)  # raylab's retention may have deleted folders Ray's registry lists
    trainer_cls, entry, worker_env = _framework_trainer(task_name, launch)
    trainer = trainer_cls(
        entry,
        train_loop_config={"task": task_name, "cfg": cfg.model_dump(mode="json"), "progress_queue": queue, "env": raylab_environment()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=launch.num_workers, use_gpu=launch.use_gpu,
            resources_per_worker={"CPU": launch.cpus_per_worker, **({"GPU": 1} if launch.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            # Ray keeps every checkpoint: its CheckpointConfig keeps either the newest K or the best
            # K by a score, never both, and only among folders its registry knows. Rank 0 applies
            # raylab's policy (raylab.retention) after each report instead, orphans included.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=launch.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
            callbacks=[FailureReporter(queue, launch.max_failures), *callbacks],
            **({"worker_runtime_env": {"env_vars": worker_env}} if worker_env else {}),
        ),
    )
    if embedded:
        from raylab.ray_embedded import lean_controller

        lean_controller(trainer, keep_placement_group_cleaner=tune)
    return trainer


def run_on_ray(
    task_name: str, cfg: TrainConfig, launch: LaunchConfig, name: str, storage_path: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> RayRunResult:
    """Run one training job with Ray Train; progress updates go to `on_progress` on this thread."""
    from ray.util.queue import Empty, Queue

    local = ensure_ray(launch)
    check_resources(launch, local)
    queue = Queue(actor_options={"num_cpus": 0}) if on_progress else None
    trainer = make_trainer(task_name, cfg, launch, name, storage_path, queue, embedded=local)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="raylab-fit", daemon=True)
    thread.start()
    try:
        while True:
            alive = thread.is_alive()
            if queue is not None:
                try:
                    for update in queue.get_nowait_batch(queue.qsize()):
                        on_progress(update)
                except Empty:
                    pass
            if not alive:
                break
            thread.join(timeout=0.25)  # wakes at once when fit returns
    finally:
        if queue is not None:
            with contextlib.suppress(Exception):
                queue.shutdown()
    if "error" in outcome:
        raise first_worker_error(outcome["error"]) from outcome["error"]
    result = outcome["result"]
    return RayRunResult(
        run_path=result.path, storage_path=storage_path,
        latest_checkpoint=result.checkpoint.path if result.checkpoint else None,
    )
