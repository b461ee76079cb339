"""The TensorFlow half of the training loop: what `raylab.loop_core` leaves to the framework.

`train_tf(task, cfg, session)` builds a TensorFlow task's parts inside a
distribution strategy and hands a `TfStepper` to the core, which owns the
position, data plan, cadence, reports, state.json and the replica check.

- Strategy: `MultiWorkerMirroredStrategy` from `TF_CONFIG` (set by Ray's
  TensorflowTrainer on every worker), else TensorFlow's default strategy
  (`--workers 0`). Keras 3's `model.fit` fails under MWMS on Ray, so the step is
  our own: `strategy.run` of a forward/backward pass per micro-batch (each
  worker feeds its own shard as plain tensors), gradients all-reduced by the
  Keras optimizer inside `strategy.run`.
- Loss scaling: a task returns (loss sum, weight) per micro-batch; the step
  divides by the weight summed over all workers, so N workers x batch B give
  the gradients of 1 worker x batch N*B (up to float summation order).
- EMA (`ema_decay`): `raylab.tf_ema`, updated after each step, swapped in for
  evaluation and sampling, saved as `ema.safetensors`.
- Checkpoints: every `model.variables` and `optimizer.variables` (its
  `iterations` included: the LR schedule and Adam's bias correction resume from
  it) as safetensors through numpy, keyed by variable path; the optimizer is
  built before anything is restored. Seed-generator states differ per worker
  (dropout masks must not repeat across workers), so they travel with each
  worker's RNG state in state.json, not in model.safetensors' rank-0 copy.
- Determinism: oneDNN off and a fixed intra-op thread count (RAYLAB_TF_THREADS,
  default: this machine's cores); both are recorded in every checkpoint's
  task metadata, and a resume under other settings says it is not bit-exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from raylab.checkpoint import CheckpointError, read_checkpoint_state
from raylab.config import TrainConfig
from raylab.loop_core import RunPlan, run_loop
from raylab.session import Session
from raylab.task import SampleOutput, TaskContext, TfTask, task_name_of
from raylab.tf_ema import KerasEma, load_ema_weights

__all__ = ["TF_ENV", "TfStepper", "build_for_inference", "configure_tensorflow", "train_tf"]

# Read by TensorFlow once, at import: oneDNN off = a silent import and one fixed set of float bits.
TF_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
MODEL_FILE, OPTIMIZER_FILE, EVALUATIONS_FILE = "model.safetensors", "optimizer.safetensors", "evaluations.json"
SEED_STATE = "seed_generator_state"


def configure_tensorflow() -> dict[str, Any]:
    """Environment and threads for reproducible TensorFlow, before its first op; returns the settings."""
    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    import tensorflow as tf

    tf.get_logger().setLevel("WARNING")  # MWMS logs every collective at INFO, twice
    threads = int(os.environ.get("RAYLAB_TF_THREADS") or os.cpu_count() or 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:  # TensorFlow already ran an op in this process: keep what it has
        pass
    return {
        "tensorflow": tf.__version__, "onednn": os.environ["TF_ENABLE_ONEDNN_OPTS"],
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def make_strategy():
    """MWMS when Ray's TensorflowTrainer described a cluster of several workers in TF_CONFIG, else
    the default strategy: one worker needs no collectives, and XLA can then compile the whole
    forward/backward pass (under MWMS it cannot compile a model that synchronises inside)."""
    import tensorflow as tf

    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    if len(cluster.get("worker", [])) > 1:
        options = tf.distribute.experimental.CommunicationOptions(implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return tf.distribute.get_strategy()


class Collectives:
    """all_reduce_sum / all_gather_object for the core and tasks, over the strategy's own collectives."""

    def __init__(self, strategy, rank: int, world_size: int):
        self.strategy, self.rank, self.world_size = strategy, rank, world_size

    def _sum(self, array: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        value = tf.constant(array)
        per_replica = self.strategy.run(tf.function(lambda: tf.identity(value)))
        return np.asarray(self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return dict(values)
        keys = sorted(values)
        return dict(zip(keys, self._sum(np.array([float(values[k]) for k in keys], dtype=np.float64)).tolist()))

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        lengths = np.zeros(self.world_size)
        lengths[self.rank] = data.size
        lengths = self._sum(lengths).astype(int)
        rows = np.zeros((self.world_size, int(lengths.max())), dtype=np.float32)  # bytes are exact in float32
        rows[self.rank, : data.size] = data
        rows = self._sum(rows)
        return [json.loads(rows[r, : lengths[r]].astype(np.uint8).tobytes()) for r in range(self.world_size)]


def variables_by_path(variables: Iterable[Any], what: str) -> dict[str, Any]:
    """{path: variable}; two variables with one path would overwrite each other in a checkpoint."""
    out: dict[str, Any] = {}
    for v in variables:
        if v.path in out:
            raise CheckpointError(f"two {what} variables share the path '{v.path}': give every layer an explicit, unique name.")
        out[v.path] = v
    return out


def save_variables(path: Path, variables: dict[str, Any]) -> None:
    import safetensors.numpy

    safetensors.numpy.save_file({k: np.array(v.numpy(), order="C") for k, v in variables.items()}, str(path))


def load_variables(path: Path, variables: dict[str, Any]) -> None:
    """Assign every variable from `path`; the file must hold exactly these paths and shapes."""
    import safetensors.numpy

    saved = safetensors.numpy.load_file(str(path))
    missing, unexpected = sorted(set(variables) - set(saved)), sorted(set(saved) - set(variables))
    wrong = [k for k in variables if k in saved and tuple(saved[k].shape) != tuple(variables[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]}.")
    for key, variable in variables.items():
        variable.assign(saved[key])


def build_for_inference(task: TfTask, cfg: TrainConfig, ctx: TaskContext, directory: Path) -> Any:
    """A TensorFlow task's model built in this process (default strategy) with a checkpoint's
    weights, for `raylab sample`; the task's `build` runs, so it reads its data as in training."""
    configure_tensorflow()
    import keras

    keras.utils.set_random_seed(cfg.seed)
    model = task.build(cfg, ctx).model
    variables = variables_by_path(model.variables, "model")
    load_variables(directory / MODEL_FILE, variables)
    load_ema_weights(directory, variables)  # EMA weights when the run kept them
    return model


class TfStepper:
    """The core's `Stepper` for a TensorFlow task."""

    framework = "tensorflow"

    def __init__(self, task: TfTask, cfg: TrainConfig, session: Session):
        self.settings = configure_tensorflow()
        import keras

        self.task, self.cfg, self.session = task, cfg, session
        self.strategy = make_strategy()
        self.collectives = Collectives(self.strategy, session.world_rank, session.world_size)
        self.ctx = TaskContext(session.world_rank, session.world_size, session.local_rank, session.device,
                               self.collectives.all_reduce_sum, self.collectives.all_gather_object)
        keras.utils.set_random_seed(cfg.seed)  # the same initial weights on every worker
        with self.strategy.scope():
            self.parts = task.build(cfg, self.ctx)
        self.model = self.parts.model
        self.num_samples = len(self.parts.train_data)
        self.weights = variables_by_path(self.model.variables, "model")
        self.seed_states = {k: v for k, v in self.weights.items() if k.endswith(SEED_STATE)}
        self.ema = KerasEma(self.weights, self.model.trainable_variables, cfg.ema_decay) if cfg.ema_decay else None
        self.evaluations: list[dict[str, float]] = []  # every evaluation's metrics, for early stopping
        self.gradless: set[str] = set()  # trainable variables the loss gives no gradient (noted while tracing)
        self.grad_nonfinite: np.ndarray | None = None  # per trainable variable: workers with NaN/inf in its last gradient

    def health_probe(self):
        from raylab.tf_health import KerasProbe

        return KerasProbe(self)

    # -- schedule, state on disk, RNG ------------------------------------------------
    def start_schedule(self, scheduled_steps: int) -> None:
        plan = RunPlan.of(self.cfg, self.num_samples, self.ctx.world_rank, self.ctx.world_size)
        with self.strategy.scope():
            self.optimizer = self.parts.make_optimizer(plan.steps_per_epoch, scheduled_steps)
            # Built now: an unbuilt optimizer has only `iterations`, and a restore would skip its slots.
            self.optimizer.build(self.model.trainable_variables)
        self.slots = variables_by_path(self.optimizer.variables, "optimizer")
        self._compile_steps()

    def load(self, directory: Path) -> None:
        load_variables(directory / MODEL_FILE, self.weights)
        load_variables(directory / OPTIMIZER_FILE, self.slots)
        evaluations = directory / EVALUATIONS_FILE
        self.evaluations = json.loads(evaluations.read_text()) if evaluations.is_file() else []
        if self.ema is not None:
            self.ema.load(directory)
        saved = read_checkpoint_state(directory, verify=False).get("task_metadata", {}).get("tensorflow", {})
        differs = {k: (saved.get(k), v) for k, v in self.settings.items() if k in saved and saved[k] != v}
        if differs and self.ctx.is_main:
            self.session.progress({"notice": "TensorFlow settings differ from the checkpoint's ("
                                   + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differs.items()) + "): not bit-exact"})

    def warm_start(self, directory: Path, source: str):
        import safetensors.numpy

        from raylab.warm_start import match_tensors

        saved = safetensors.numpy.load_file(str(Path(directory) / MODEL_FILE))
        own = set(self.parts.data_variables)
        report = match_tensors(source, {k: tuple(v.shape) for k, v in saved.items()}, {k: tuple(v.shape) for k, v in self.weights.items()},
                               keep=lambda path: path.endswith(SEED_STATE) or path.rsplit("/", 1)[-1] in own)
        for key in report.loaded:
            self.weights[key].assign(saved[key])
        if self.ema is not None:
            self.ema.reset()  # the average starts at the warm weights
        return report

    def save(self, directory: Path) -> None:
        save_variables(directory / MODEL_FILE, self.weights)
        save_variables(directory / OPTIMIZER_FILE, self.slots)
        (directory / EVALUATIONS_FILE).write_text(json.dumps(self.evaluations))
        if self.ema is not None:
            self.ema.save(directory)

    def capture_rng(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        return {
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "numpy": {**numpy_state, "state": {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]}},
            "seed_generators": {k: np.asarray(v.numpy()).tolist() for k, v in self.seed_states.items()},
        }

    def restore_rng(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy_state = state["numpy"]
        np.random.set_state({**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32), "pos": numpy_state["state"]["pos"]}})
        for key, value in state["seed_generators"].items():
            self.seed_states[key].assign(np.asarray(value, dtype=self.seed_states[key].dtype))

    def seed_streams(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # Each worker's dropout draws its own masks: a seed per (worker seed, generator).
        for i, variable in enumerate(self.seed_states.values()):
            start = np.random.default_rng([seed, i]).integers(1, 2**31 - 1)
            variable.assign(np.array([start, 0], dtype=variable.dtype))

    # -- training ---------------------------------------------------------------------
    def _compile_steps(self) -> None:
        """Two distributed functions: a micro-batch that only accumulates gradients, and the last
        micro-batch of a step, which also applies them. Everything that synchronises workers
        (loss weight, gradient all-reduce in the optimizer) runs inside one `strategy.run`:
        gradients handed from one `strategy.run` to another fail under MWMS."""
        import tensorflow as tf

        model, task, optimizer, cfg = self.model, self.task, self.optimizer, self.cfg
        trainable = model.trainable_variables
        gradless, check_grads = self.gradless, cfg.health.active("nonfinite_grads")
        accumulators = []
        if cfg.grad_accum_steps > 1:
            with self.strategy.scope():  # one private copy per worker, read and written in replica context
                accumulators = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                                            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA) for v in trainable]

        def forward_backward(batch):
            with tf.GradientTape() as tape:
                loss_sum, weight, metrics = task.loss(model, batch)
            grads = tape.gradient(loss_sum, trainable)
            gradless.update(v.path for g, v in zip(grads, trainable) if g is None)  # Python: runs while tracing
            return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, trainable)], loss_sum, weight, metrics

        if self.parts.jit_compile:
            # A nested function of its own: XLA cannot compile the collectives around it. A model
            # that synchronises inside (BatchNorm(synchronized=True) on several workers) cannot be compiled.
            forward_backward = tf.function(forward_backward, jit_compile=True)

        def replica_step(batch, apply: bool):
            grads, loss_sum, weight, metrics = forward_backward(batch)
            context = tf.distribute.get_replica_context()
            loss_sum, weight = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.cast(loss_sum, tf.float32), tf.cast(weight, tf.float32)])
            # d(sum / global weight) = d(sum) / global weight: the weight is no function of the weights.
            factor = tf.math.divide_no_nan(1.0 / cfg.grad_accum_steps, weight)
            grads = [g * factor + a for g, a in zip(grads, accumulators)] if accumulators else [g * factor for g in grads]
            if metrics:
                metrics = context.all_reduce(tf.distribute.ReduceOp.MEAN, {k: tf.cast(v, tf.float32) for k, v in metrics.items()})
            nonfinite = tf.zeros([0])
            if apply and check_grads:  # health check nonfinite_grads: per variable, summed over the workers
                nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.stack(
                    [tf.cast(tf.logical_not(tf.reduce_all(tf.math.is_finite(g))), tf.float32) for g in grads]))
            if not apply:
                for a, g in zip(accumulators, grads):
                    a.assign(g)
            else:
                if cfg.grad_clip_norm is not None:
                    # Clip by the norm of the summed gradient; scaling commutes with the optimizer's sum.
                    total = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
                    grads = [g * tf.minimum(1.0, cfg.grad_clip_norm / (tf.linalg.global_norm(total) + 1e-12)) for g in grads]
                optimizer.apply_gradients(zip(grads, trainable))
                for a in accumulators:
                    a.assign(tf.zeros_like(a))
            return tf.math.divide_no_nan(loss_sum, weight), metrics, nonfinite

        self._steps = {
            apply: tf.function(lambda batch, apply=apply: self.strategy.run(replica_step, args=(batch, apply)))
            for apply in (False, True)
        }

    def start_training(self) -> None:
        pass  # Keras layers take `training=` per call: no mode to switch

    def batches(self, epoch: int, plan: list[list[int]]) -> Iterable[Any]:
        import tensorflow as tf

        for indices in plan:
            yield tuple(tf.convert_to_tensor(a) for a in self.parts.train_data.batch(indices))

    def train_micro_batch(self, batch: Any, step_ends: bool, accum: int) -> dict[str, float]:
        """Forward and backward; on the last micro-batch of a step the optimizer step too (see _compile_steps)."""
        loss, metrics, nonfinite = self._steps[step_ends](batch)
        if step_ends:
            self.grad_nonfinite = np.asarray(nonfinite) if nonfinite.shape[0] else None
        return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

    def optimizer_step(self) -> None:
        # The step itself was applied by the last micro-batch, inside the same strategy.run.
        if self.ema is not None:
            self.ema.update()

    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate)

    # -- evaluation and sampling --------------------------------------------------------
    def _inference_weights(self):
        """EMA weights for evaluation and sampling when on, the live ones otherwise."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def evaluate(self) -> dict[str, float]:
        with self._inference_weights():
            result = {k: float(v) for k, v in self.task.evaluate(self.model, self.ctx).items()}
        self.evaluations.append(result)
        if self.should_stop() and self.ctx.is_main:
            self.session.progress({"notice": f"early stopping after evaluation {len(self.evaluations)}: no improvement "
                                   "within the task's patience; the run ends with this epoch"})
        return result

    def should_stop(self) -> bool:
        """The task's early stopping (`should_stop(history)`), over every evaluation of the run."""
        decide = getattr(self.task, "should_stop", None)
        return bool(decide and self.evaluations and decide(self.evaluations))

    def sample(self, n: int) -> SampleOutput:
        with self._inference_weights():
            out = self.task.sample(self.model, n, self.ctx)
        return out if isinstance(out, SampleOutput) else SampleOutput(samples=list(out))

    def fingerprint(self) -> list[float]:
        """Per-variable float64 sums of the trainable variables: equal on every worker."""
        return [float(np.asarray(v.numpy(), dtype=np.float64).sum()) for v in self.model.trainable_variables]

    def finish(self) -> None:
        pass


def train_tf(task: TfTask, cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train a TensorFlow `task` with `cfg`, reporting to `session`; returns the last report's metrics."""
    stepper = TfStepper(task, cfg, session)
    # The TensorFlow settings that decide the bits go into every checkpoint beside the task's facts.
    metadata = {**stepper.parts.metadata, "tensorflow": stepper.settings}
    headline = tuple(getattr(task, "headline_metrics", ("loss",)))
    return run_loop(stepper, cfg, session, task_name_of(task), headline=headline, metadata=metadata)
