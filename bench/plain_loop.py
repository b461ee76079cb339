"""The baselines raylab is measured against: a plain PyTorch loop, and a bare Ray `TorchTrainer`.

Both train a registered task's own model, data, optimizer and schedule -- the
same objects `raylab train` builds, from the same experiment stage and `--set`
overrides -- with the loop a user would write by hand: a shuffled DataLoader,
forward + backward through the task's `loss`, optimizer and scheduler steps,
`float(loss)` for a log line. Every task is stamped (`bench.stamps`), so both
sides are timed by the same clock at the same point as raylab.

    python -m bench.plain_loop tinyimagenet --stage quick --set max_steps=100      # plain PyTorch, this process
    python -m bench.plain_loop tinyimagenet --stage quick --bare-trainer           # ray.train.torch.TorchTrainer, 1 worker

`--eval-each-epoch` evaluates after every epoch (and the bare trainer then
reports each epoch's metrics with a checkpoint of the weights, as the quick
stage does); otherwise the only evaluation follows the last step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from bench.stamps import TIMELINE_ENV, install, ray_worker_env, stamp


def plain_loop(task_name: str, cfg_json: dict[str, Any], eval_each_epoch: bool, report: Any = None) -> None:
    """Train like a hand-written script; `report(metrics, model)` after each evaluation (the bare trainer's)."""
    import torch
    from torch.utils.data import DataLoader

    from raylab.task import TaskContext, get_task

    install()  # a no-op where the process is already stamped
    task = get_task(task_name)
    cfg = task.config_cls.model_validate(cfg_json)
    torch.manual_seed(cfg.seed)
    ctx = TaskContext()
    parts = task.build(cfg, ctx)
    model, optimizer = parts.model, parts.optimizer
    steps_per_epoch = len(parts.train_data) // cfg.per_worker_batch_size
    total = steps_per_epoch * cfg.max_epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.max_epochs)
    scheduler = parts.make_scheduler(optimizer, total) if parts.make_scheduler else None
    step = 0
    for epoch in range(cfg.max_epochs):
        if hasattr(parts.train_data, "set_epoch"):
            parts.train_data.set_epoch(epoch)
        loader = DataLoader(parts.train_data, batch_size=cfg.per_worker_batch_size, shuffle=True, drop_last=True,
                            num_workers=cfg.data_loader_workers, collate_fn=parts.collate_fn,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        model.train()
        for batch in loader:
            loss, _ = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            float(loss.detach())  # what a log line reads; raylab reads it every step too
            step += 1
            if step >= total:
                break
        last = step >= total
        if eval_each_epoch or last:
            model.eval()
            with torch.no_grad():
                metrics = task.evaluate(model, ctx)
            if report is not None:
                report(metrics, model)
        if last:
            return


def _bare_worker(config: dict[str, Any]) -> None:
    """The train function of the bare TorchTrainer: the plain loop, reporting each evaluation."""
    import shutil

    import ray.train
    import torch

    def report(metrics: dict[str, float], model: Any) -> None:
        directory = tempfile.mkdtemp()
        torch.save(model.state_dict(), os.path.join(directory, "model.pt"))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(directory))
        shutil.rmtree(directory, ignore_errors=True)

    plain_loop(config["task"], config["cfg"], config["eval_each_epoch"], report)


def bare_trainer(task_name: str, cfg_json: dict[str, Any], eval_each_epoch: bool, storage: str, workers: int) -> None:
    """What a user writes without raylab: ray.init, a TorchTrainer with Ray Train's defaults, fit()."""
    import logging

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    stamp("ray_start_start")
    # The embedded-instance settings raylab also uses, so the comparison is about Train, not the dashboard.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    stamp("ray_start_end")
    trainer = TorchTrainer(
        _bare_worker,
        train_loop_config={"task": task_name, "cfg": cfg_json, "eval_each_epoch": eval_each_epoch},
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(storage_path=storage, name="bare"),
    )
    stamp("fit_start")
    trainer.fit()
    stamp("fit_end")
    if os.environ.get(TIMELINE_ENV):  # the same export as bench.stamps does for raylab, stamped to be left out
        stamp("timeline_start")
        ray.timeline(os.environ[TIMELINE_ENV])
        stamp("timeline_end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--stage", default="quick")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value, as for raylab train")
    parser.add_argument("--eval-each-epoch", action="store_true")
    parser.add_argument("--bare-trainer", action="store_true", help="run the loop in a bare Ray TorchTrainer")
    parser.add_argument("--workers", type=int, default=1, help="bare trainer workers")
    parser.add_argument("--storage", default=tempfile.gettempdir(), help="bare trainer storage folder")
    args = parser.parse_args(argv)
    stamp("main_start")
    from raylab.config import parse_overrides
    from raylab.launch import prepare

    _, cfg = prepare(args.model, args.stage, parse_overrides(args.sets))
    stamp("cli_imported")
    if args.bare_trainer:
        os.environ.update(ray_worker_env())
        bare_trainer(args.model, cfg.model_dump(mode="json"), args.eval_each_epoch, args.storage, args.workers)
    else:
        plain_loop(args.model, cfg.model_dump(mode="json"), args.eval_each_epoch)
    stamp("main_end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
