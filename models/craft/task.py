"""The CRAFT text detector as a raylab task: data, model, loss, H-mean, sampled boxes.

    raylab train craft --stage quick --workers 0

The data is an ICDAR-2015 folder when `data_dir` is set, else a synthetic
dataset written in that same format (cached) and read by the same loader. The
loop sees (image, region, affinity, mask) batches; the loss is CRAFT's mined
MSE (`cls_loss` on the region map + `geo_loss` on the affinity map, the seed's
names). Evaluation runs the network on the whole test split, turns the maps
into word boxes and scores them ICDAR-style; counts are summed across workers
before precision, recall and H-mean are taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.craft.config import CraftConfig
from models.craft.data import IMAGENET_MEAN, IMAGENET_STD, CraftDataset, ImageRecord, Placement, load_split, read_rgb
from models.craft.evaluation import MatchCounts, match_image
from models.craft.loss import MiningConfig, craft_loss
from models.craft.model import build_craft, count_parameters
from models.craft.postprocess import PostprocessThresholds, detect_words
from models.craft.synthetic import GENERATOR_VERSION, write_synthetic
from raylab.cache import cache_dir
from raylab.lr_schedules import warmup_then
from raylab.task import SampleOptions, SampleOutput, TaskContext, TorchParts

_PNG_TILE = 256  # px: the longer side of each sample image in the PNG


def synthetic_root(cfg: CraftConfig) -> Path:
    if cfg.synthetic_dir is not None:
        return cfg.synthetic_dir
    # The generator version is part of the name: a newer generator writes a new folder
    # instead of tripping over an older one's marker.
    name = (f"g{GENERATOR_VERSION}-n{cfg.synthetic_train_images}-v{cfg.synthetic_val_images}"
            f"-px{cfg.synthetic_image_size}-s{cfg.synthetic_seed}")
    return cache_dir("craft-synthetic", name)


def make_optimizer(cfg: CraftConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def to_image_coords(quad: np.ndarray, placement: Placement) -> np.ndarray:
    """A quad in half-resolution map pixels -> the original image's pixels."""
    return (quad * 2.0 - np.float32([placement.dx, placement.dy])) / placement.scale


class CraftTask:
    config_cls = CraftConfig
    headline_metrics = ("loss", "cls_loss", "geo_loss", "hmean")

    def build(self, cfg: CraftConfig, ctx: TaskContext) -> TorchParts:
        if cfg.data_dir is not None:
            root = cfg.data_dir
        else:
            root = write_synthetic(
                synthetic_root(cfg), cfg.synthetic_train_images, cfg.synthetic_val_images, cfg.synthetic_image_size, cfg.synthetic_seed
            )
        self.cfg = cfg
        self.mining = MiningConfig(cfg.positive_threshold, cfg.negative_ratio, cfg.negatives_without_positives)
        self.thresholds = PostprocessThresholds(cfg.text_threshold, cfg.link_threshold, cfg.low_text)
        self.val_data = CraftDataset(load_split(root, "test"), cfg.eval_image_size, augment=False, seed=cfg.seed)
        train_data = self.train_data = CraftDataset(
            load_split(root, "train"), cfg.image_size, cfg.augment, cfg.seed, cfg.augment_min_scale, cfg.augment_max_scale
        )
        model = build_craft(cfg.width_divisor).to(ctx.device)
        optimizer = make_optimizer(cfg, model.parameters())

        def make_scheduler(opt: torch.optim.Optimizer, total_steps: int):
            return warmup_then(opt, total_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.lr_step_gamma, cfg.lr_step_every_steps)

        metadata = {
            "outputs": ["region", "affinity"], "output_stride": 2, "input": "RGB, /255, ImageNet mean/std",
            "image_mean": IMAGENET_MEAN.tolist(), "image_std": IMAGENET_STD.tolist(),
            "thresholds": {"text": cfg.text_threshold, "link": cfg.link_threshold, "low_text": cfg.low_text},
        }
        return TorchParts(model=model, optimizer=optimizer, train_data=train_data, make_scheduler=make_scheduler, metadata=metadata)

    def describe_sample(self, index: int) -> str:
        """A training sample's image file, for the health checks' messages."""
        return str(self.train_data.records[index].image)

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, region, affinity, mask = batch
        loss, cls_loss, geo_loss = craft_loss(model(images), region, affinity, mask, self.mining)
        return loss, {"cls_loss": cls_loss.detach(), "geo_loss": geo_loss.detach()}

    def _predict(self, model: torch.nn.Module, indices: Sequence[int], device: str) -> Iterator[tuple[int, Any, torch.Tensor, torch.Tensor]]:
        """(index, sample, its predicted maps, its loss terms (3,)) for each validation index, batched."""
        size = self.cfg.eval_batch_size
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            items = [self.val_data.item(i) for i in chunk]
            images = torch.stack([it.image for it in items]).to(device)
            pred = model(images)
            for b, (i, item) in enumerate(zip(chunk, items)):
                target = [t[None].to(device) for t in (item.region, item.affinity, item.mask)]
                terms = torch.stack(craft_loss(pred[b:b + 1], *target, self.mining))
                yield i, item, pred[b].float().cpu(), terms.cpu()

    def _detect(self, pred: torch.Tensor, placement: Placement) -> list[tuple[np.ndarray, float]]:
        maps = pred.numpy()
        return [(to_image_coords(d.quad, placement), d.score) for d in detect_words(maps[..., 0], maps[..., 1], self.thresholds)]

    def evaluate(self, model: torch.nn.Module, ctx: TaskContext) -> dict[str, float]:
        # Each worker scores its own slice of the test split; sums and counts are added across workers.
        indices = list(range(ctx.world_rank, len(self.val_data), ctx.world_size))
        sums = {"loss": 0.0, "cls_loss": 0.0, "geo_loss": 0.0, "images": 0.0}
        counts = MatchCounts()
        for i, item, pred, terms in self._predict(model, indices, ctx.device):
            for key, value in zip(("loss", "cls_loss", "geo_loss"), terms.tolist()):
                sums[key] += value
            sums["images"] += 1
            counts += self._score(self.val_data.records[i], self._detect(pred, item.placement))
        total = ctx.all_reduce_sum({**sums, "matched": counts.matched, "gt": counts.gt, "detections": counts.detections})
        n = max(total["images"], 1.0)
        result = MatchCounts(int(total["matched"]), int(total["gt"]), int(total["detections"]))
        return {"loss": total["loss"] / n, "cls_loss": total["cls_loss"] / n, "geo_loss": total["geo_loss"] / n,
                "precision": result.precision, "recall": result.recall, "hmean": result.hmean}

    @staticmethod
    def _score(record: ImageRecord, detections: list[tuple[np.ndarray, float]]) -> MatchCounts:
        return match_image([w.quad for w in record.words], [w.dont_care for w in record.words], [q for q, _ in detections])

    def sample(self, model: torch.nn.Module, n: int, ctx: TaskContext, options: SampleOptions | None = None) -> SampleOutput:
        """Predicted word boxes (image pixels, clockwise from top-left) on the first n validation images."""
        indices = list(range(min(n, len(self.val_data))))
        samples, tiles = [], []
        counts = MatchCounts()
        for i, item, pred, _ in self._predict(model, indices, ctx.device):
            record = self.val_data.records[i]
            detections = self._detect(pred, item.placement)
            image_counts = self._score(record, detections)
            counts += image_counts
            samples.append({
                "image": record.image.name,
                "boxes": [np.round(q, 1).tolist() for q, _ in detections],
                "scores": [round(s, 4) for _, s in detections],
                "gt_boxes": [w.quad.tolist() for w in record.words],
                "gt_texts": [w.text for w in record.words],
                "matched": image_counts.matched, "gt_words": image_counts.gt, "detected_words": image_counts.detections,
            })
            tiles.append(_draw_tile(record, detections, pred, item.placement))
        png = _encode_grid(tiles) if tiles else None
        return SampleOutput(samples=samples, metrics={"sample_hmean": counts.hmean} if samples else {}, png=png)

    def describe(self, cfg: CraftConfig) -> str:
        data = str(cfg.data_dir) if cfg.data_dir else f"synthetic {cfg.synthetic_train_images} x {cfg.synthetic_image_size} px"
        return (f"CRAFT width /{cfg.width_divisor}, {cfg.image_size} px train / {cfg.eval_image_size} px val, "
                f"{cfg.max_epochs} epochs x batch {cfg.per_worker_batch_size}/worker, {data}")

    def num_parameters(self, cfg: CraftConfig) -> int:
        with torch.device("meta"):
            return count_parameters(build_craft(cfg.width_divisor))


def _draw_tile(record: ImageRecord, detections: list[tuple[np.ndarray, float]], pred: torch.Tensor, placement: Placement) -> np.ndarray:
    """One PNG row: the image with ground truth (green, don't-care grey) and detections (red), then both maps."""
    image = read_rgb(record.image)
    original_h, original_w = image.shape[:2]
    scale = _PNG_TILE / max(original_h, original_w)  # small images are enlarged so boxes stay visible
    image = np.ascontiguousarray(cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST))
    for word in record.words:
        colour = (160, 160, 160) if word.dont_care else (0, 200, 0)
        cv2.polylines(image, [np.round(word.quad * scale).astype(np.int32)], True, colour, 1)
    for quad, _ in detections:
        cv2.polylines(image, [np.round(quad * scale).astype(np.int32)], True, (255, 0, 0), 1)
    height, width = image.shape[:2]
    # The maps cover the whole padded canvas; keep the part over the image.
    map_h = max(1, math.ceil(original_h * placement.scale / 2))
    map_w = max(1, math.ceil(original_w * placement.scale / 2))
    maps = []
    for channel in range(2):
        heat = (np.clip(pred[:map_h, :map_w, channel].numpy(), 0, 1) * 255).astype(np.uint8)
        heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        maps.append(cv2.resize(heat, (width, height), interpolation=cv2.INTER_NEAREST))
    return np.concatenate([image, *maps], axis=1)


def _encode_grid(tiles: list[np.ndarray]) -> bytes:
    width = max(t.shape[1] for t in tiles)
    rows = [np.pad(t, ((0, 2), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the sample image grid as PNG.")
    return data.tobytes()
