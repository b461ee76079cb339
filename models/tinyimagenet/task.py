"""TinyImageNet classifiers as a raylab task: data, model, loss, metrics, samples.

The four families of seed 003 train through the shared loop; the data is the
real TinyImageNet-200 folder when `data_dir` is set, else a synthetic dataset
written in that same layout and read by the same loader. Validation accuracy
is computed over the whole val split across all workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.tinyimagenet.config import TinyImageNetConfig
from models.tinyimagenet.data import DataError, ImageClassificationDataset, load_index, write_synthetic
from models.tinyimagenet.model import build_model, count_parameters
from raylab.cache import cache_dir
from raylab.lr_schedules import warmup_then
from raylab.task import SampleOptions, TaskContext, TorchParts


def synthetic_root(cfg: TinyImageNetConfig) -> Path:
    if cfg.synthetic_dir is not None:
        return cfg.synthetic_dir
    name = f"c{cfg.synthetic_classes}-n{cfg.synthetic_train_per_class}-v{cfg.synthetic_val_per_class}-s{cfg.synthetic_seed}"
    return cache_dir("tinyimagenet-synthetic", name)


def make_optimizer(cfg: TinyImageNetConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class TinyImageNetTask:
    config_cls = TinyImageNetConfig
    headline_metrics = ("loss", "accuracy")

    def build(self, cfg: TinyImageNetConfig, ctx: TaskContext) -> TorchParts:
        if cfg.data_dir is not None:
            root = cfg.data_dir
        else:
            root = write_synthetic(
                synthetic_root(cfg), cfg.synthetic_classes, cfg.synthetic_train_per_class,
                cfg.synthetic_val_per_class, cfg.synthetic_seed,
            )
        self.index = load_index(root)
        if cfg.num_classes is not None and cfg.num_classes != self.index.num_classes:
            raise DataError(
                f"num_classes is {cfg.num_classes} but {self.index.root / 'wnids.txt'} lists {self.index.num_classes} classes; "
                "fix num_classes or drop it to use the file's count."
            )
        self.cfg = cfg
        self.val_data = ImageClassificationDataset(self.index.val, cfg.image_size, augment=False, seed=cfg.seed)
        train_data = ImageClassificationDataset(self.index.train, cfg.image_size, augment=cfg.augment, seed=cfg.seed)
        model = build_model(cfg.family, self.index.num_classes, cfg.width).to(ctx.device)
        optimizer = make_optimizer(cfg, model.parameters())  # fresh per run: seed 003 suspected a reused one

        def make_scheduler(opt: torch.optim.Optimizer, total_steps: int):
            return warmup_then(opt, total_steps, cfg.warmup_steps, cfg.lr_schedule)

        return TorchParts(model=model, optimizer=optimizer, train_data=train_data, make_scheduler=make_scheduler)

    # Declarations the training health checks read (raylab.task): labels in range, the
    # output width, chance accuracy / ln(C) loss (seed 003's 0.5%), sample names in messages.
    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def class_labels(self, batch: Any) -> torch.Tensor:
        return batch[1]

    def describe_sample(self, index: int) -> str:
        return self.index.train[index][0].name

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"accuracy": accuracy}

    def evaluate(self, model: torch.nn.Module, ctx: TaskContext) -> dict[str, float]:
        # Each worker scores its own slice of the val split; the sums are added across workers.
        shard = torch.utils.data.Subset(self.val_data, range(ctx.world_rank, len(self.val_data), ctx.world_size))
        loader = DataLoader(shard, batch_size=self.cfg.eval_batch_size, num_workers=self.cfg.data_loader_workers)
        sums = {"loss": 0.0, "correct": 0.0, "top5": 0.0, "count": 0.0}
        for images, labels in loader:
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            logits = model(images)
            sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
            sums["correct"] += float((logits.argmax(dim=1) == labels).sum())
            k = min(5, logits.shape[1])
            sums["top5"] += float((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())
            sums["count"] += len(labels)
        total = ctx.all_reduce_sum(sums)
        n = max(total["count"], 1.0)
        return {"loss": total["loss"] / n, "accuracy": total["correct"] / n, "top5_accuracy": total["top5"] / n}

    def sample(self, model: torch.nn.Module, n: int, ctx: TaskContext, options: SampleOptions | None = None) -> list[dict[str, Any]]:
        """Predictions on the first n validation images: what the model thinks, in words."""
        n = min(n, len(self.val_data))
        if n == 0:
            return []
        images = torch.stack([self.val_data[i][0] for i in range(n)]).to(ctx.device)
        probs = model(images).softmax(dim=1)
        top = probs.topk(min(3, probs.shape[1]), dim=1)
        out = []
        for i in range(n):
            path, label = self.index.val[i]
            guesses = [
                {"wnid": self.index.wnids[j], "words": self.index.words.get(self.index.wnids[j], ""), "prob": round(float(p), 4)}
                for p, j in zip(top.values[i].tolist(), top.indices[i].tolist())
            ]
            out.append({"image": path.name, "label": self.index.wnids[label], "correct": guesses[0]["wnid"] == self.index.wnids[label], "top3": guesses})
        return out

    def describe(self, cfg: TinyImageNetConfig) -> str:
        data = str(cfg.data_dir) if cfg.data_dir else f"synthetic {cfg.synthetic_classes} classes"
        return f"{cfg.family} width {cfg.width}, {cfg.image_size} px, {cfg.max_epochs} epochs x batch {cfg.per_worker_batch_size}/worker, {data}"

    def num_parameters(self, cfg: TinyImageNetConfig) -> int:
        with torch.device("meta"):
            return count_parameters(build_model(cfg.family, cfg.expected_classes, cfg.width))
