"""DiT as a raylab task: data, model, the diffusion loss, validation loss and
conditional sampling rounds with a label-accuracy metric.

    raylab train dit --stage quick --workers 0
    raylab train dit --experiment experiments/dit_tokens.yaml --stage quick --workers 0
    raylab sample <run>/checkpoint_... --n 16 --label 3 --guidance 4 --out samples.json

Every sampling round draws its noise from `sample_seed` in the training layout,
for any number of samples (seed 000 crashed when sampling 2 after training on
batches of 8); it measures `sample_label_accuracy` with and without guidance
on `label_accuracy_samples` samples and returns `num_samples` of them as JSON
records (and a PNG grid for images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.dit.config import DiTConfig
from models.dit.data import (
    ImageFolderDataset, TensorPairs, index_image_folder, list_classes, synthetic_tokens, write_synthetic_images,
)
from models.dit.diffusion import Diffusion
from models.dit.model import DiTShape, build_dit, count_parameters
from models.dit.samples import NearestTemplate, png_grid, sample_records, to_data_range
from raylab.cache import cache_dir
from raylab.config import ConfigError
from raylab.lr_schedules import warmup_then
from raylab.task import SampleOptions, SampleOutput, TaskContext, TorchParts

# Validation loss uses this many fixed (timestep, noise) draws per held-out sample,
# seeded by the sample's index, so it is the same number whatever the worker count.
_VAL_SEED = 0xD17


def synthetic_image_root(cfg: DiTConfig) -> Path:
    if cfg.synthetic_dir is not None:
        return cfg.synthetic_dir
    name = f"c{cfg.synthetic_classes}-n{cfg.synthetic_per_class}-ch{cfg.channels}-px{cfg.image_size}-s{cfg.synthetic_seed}"
    return cache_dir("dit-synthetic", name)


def class_names_of(cfg: DiTConfig) -> tuple[str, ...]:
    """The classes the model is built for, read without loading any image."""
    if cfg.data_kind == "images" and cfg.data_dir is not None:
        return list_classes(cfg.data_dir)
    width = len(str(cfg.synthetic_classes - 1))
    return tuple(f"class_{c:0{width}d}" for c in range(cfg.synthetic_classes))


def shape_of(cfg: DiTConfig, num_classes: int) -> DiTShape:
    if cfg.data_kind == "images":
        return DiTShape("images", cfg.channels, cfg.image_size, num_classes)
    return DiTShape("tokens", cfg.token_features, cfg.seq_len, num_classes)


def resolve_label(label: int | str, class_names: tuple[str, ...]) -> int:
    """A class index or name -> index; ConfigError naming the valid ones."""
    if isinstance(label, str) and label in class_names:
        return class_names.index(label)
    text = str(label).strip()
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
    raise ConfigError(f"label {label!r} is not a class of this model; use an index 0-{len(class_names) - 1} or a name: {shown}.")


class DiTTask:
    config_cls = DiTConfig
    headline_metrics = ("loss", "sample_label_accuracy")

    # -- build ------------------------------------------------------------------

    def build(self, cfg: DiTConfig, ctx: TaskContext) -> TorchParts:
        self.cfg = cfg
        if cfg.data_kind == "images":
            root = cfg.data_dir
            if root is None:
                root = write_synthetic_images(synthetic_image_root(cfg), cfg.synthetic_classes, cfg.synthetic_per_class,
                                              cfg.channels, cfg.image_size, cfg.synthetic_seed)
            index = index_image_folder(root, cfg.val_fraction)
            self.class_names = index.classes
            train = ImageFolderDataset(index.train, cfg.channels, cfg.image_size)
            self.val_data = ImageFolderDataset(index.val, cfg.channels, cfg.image_size)
        else:
            self.class_names = class_names_of(cfg)
            k, t, f, s = cfg.synthetic_classes, cfg.seq_len, cfg.token_features, cfg.synthetic_seed
            train = TensorPairs(*synthetic_tokens(k, cfg.synthetic_per_class, t, f, s, split=0))
            self.val_data = TensorPairs(*synthetic_tokens(k, cfg.synthetic_val_per_class, t, f, s, split=1))
        self.shape = shape_of(cfg, len(self.class_names))
        self.diffusion = Diffusion(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end, self.shape.channel_dim, cfg.learn_sigma)
        metadata: dict[str, Any] = {"class_names": list(self.class_names), "data_kind": cfg.data_kind,
                                    "sample_shape": list(self.shape.sample_shape())}
        self.classifier = None
        if cfg.label_accuracy_samples:
            # Reading every training image once here also surfaces an unreadable file before step 0.
            self.classifier = NearestTemplate.fit(train, len(self.class_names))
            if len(self.val_data):
                metadata["template_val_accuracy"] = self.classifier.dataset_accuracy(self.val_data)
        model = build_dit(self.shape, cfg.arch).to(ctx.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def make_scheduler(opt: torch.optim.Optimizer, total_steps: int):
            return warmup_then(opt, total_steps, cfg.warmup_steps)

        return TorchParts(model=model, optimizer=optimizer, train_data=train, make_scheduler=make_scheduler, metadata=metadata)

    def build_for_sampling(self, cfg: DiTConfig, ctx: TaskContext, metadata: dict[str, Any]) -> torch.nn.Module:
        """The model for `raylab sample`, from the config and the checkpoint's metadata alone:
        no data is read, so a checkpoint samples on a machine without the dataset (no label
        accuracy then: there are no templates)."""
        self.cfg = cfg
        self.class_names = tuple(metadata.get("class_names") or class_names_of(cfg))
        self.shape = shape_of(cfg, len(self.class_names))
        self.diffusion = Diffusion(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end, self.shape.channel_dim, cfg.learn_sigma)
        self.classifier = None
        self.val_data = None
        return build_dit(self.shape, cfg.arch).to(ctx.device)

    # -- training and evaluation ------------------------------------------------------

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0, labels = batch
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        terms = self.diffusion.training_losses(model, x0, t, labels, torch.randn_like(x0))
        metrics = {k: v.mean().detach() for k, v in terms.items() if k != "loss"}
        return terms["loss"].mean(), metrics

    def evaluate(self, model: torch.nn.Module, ctx: TaskContext) -> dict[str, float]:
        """The diffusion loss on the held-out split at fixed timesteps and noise (deterministic)."""
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        mine = list(range(ctx.world_rank, len(self.val_data), ctx.world_size))
        sums = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "count": 0.0}
        for start in range(0, len(mine), self.cfg.eval_batch_size):
            chunk = mine[start:start + self.cfg.eval_batch_size]
            items = [self.val_data[i] for i in chunk]
            x0 = torch.stack([x for x, _ in items]).to(ctx.device)
            labels = torch.tensor([y for _, y in items], device=ctx.device)
            t, noise = self._fixed_draws(chunk, x0)
            terms = self.diffusion.training_losses(model, x0, t.to(ctx.device), labels, noise.to(ctx.device))
            for key in ("loss", "mse", "vb"):
                if key in terms:
                    sums[key] += float(terms[key].double().sum())
            sums["count"] += len(chunk)
        total = ctx.all_reduce_sum(sums)
        n = max(total.pop("count"), 1.0)
        return {k: v / n for k, v in total.items() if k != "vb" or self.cfg.learn_sigma}

    def _fixed_draws(self, indices: list[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ts, noises = [], []
        for i in indices:
            g = torch.Generator().manual_seed(_VAL_SEED * 1_000_003 + i)
            ts.append(torch.randint(0, self.diffusion.num_timesteps, (1,), generator=g))
            noises.append(torch.randn(like.shape[1:], generator=g))
        return torch.cat(ts), torch.stack(noises)

    # -- sampling ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, labels: torch.Tensor, guidance: float, steps: int, seed: int, device: str) -> torch.Tensor:
        """DDIM samples in model space ([-1, 1], training layout), one per label, for any count."""
        g = torch.Generator(device=device).manual_seed(seed)
        shape = (len(labels), *self.shape.sample_shape())
        return self.diffusion.ddim_sample(
            model, shape, labels.to(device), self.shape.num_classes, steps=steps, guidance=guidance,
            eta=self.cfg.ddim_eta, clip_denoised=self.cfg.clip_denoised, generator=g, device=device,
        )

    def sample(self, model: torch.nn.Module, n: int, ctx: TaskContext, options: SampleOptions | None = None) -> SampleOutput:
        """A sampling round: n conditional samples (labels cycling through the classes, or
        options.label), the label accuracy of this round, and a PNG grid for images."""
        options = options or SampleOptions()
        cfg, k = self.cfg, self.shape.num_classes
        guidance = cfg.guidance_scale if options.guidance is None else float(options.guidance)
        if guidance < 1.0 and guidance != 0.0:
            raise ConfigError(f"guidance {guidance} must be at least 1 (1 or 0: no guidance).")
        guidance = max(guidance, 1.0)
        if guidance > 1.0 and cfg.class_dropout_prob == 0:
            raise ConfigError("guidance needs a model trained with class_dropout_prob > 0 (it has no null label); use guidance 1.")
        steps = options.steps or cfg.sampling_steps
        if not 1 <= steps <= cfg.diffusion_steps:
            raise ConfigError(f"steps {steps} must be between 1 and diffusion_steps ({cfg.diffusion_steps}).")
        seed = cfg.sample_seed if options.seed is None else int(options.seed)
        fixed = None if options.label is None else resolve_label(options.label, self.class_names)
        labels = torch.full((n,), fixed) if fixed is not None else torch.arange(n) % k
        # Label dropout is a training-mode behaviour: sampling must see the labels it asks for.
        was_training = model.training
        model.eval()
        try:
            x = self.generate(model, labels, guidance, steps, seed, ctx.device) if n else torch.zeros((0, *self.shape.sample_shape()))
            predicted = self.classifier.predict(x) if (self.classifier is not None and n) else None
            metrics: dict[str, float] = {}
            if options == SampleOptions() and self.classifier is not None and cfg.label_accuracy_samples:
                metrics = self.label_accuracy(model, steps, seed, ctx.device)
            elif predicted is not None:
                metrics = {"sample_label_accuracy": float((predicted == labels).float().mean())}
        finally:
            model.train(was_training)
        png = png_grid(to_data_range(x, "images")) if (self.shape.kind == "images" and n) else None
        records = sample_records(x, labels, self.class_names, self.shape.kind, predicted)
        for record in records:
            record.update({"guidance": guidance, "steps": steps, "seed": seed})
        return SampleOutput(samples=records, metrics=metrics, png=png)

    def label_accuracy(self, model: torch.nn.Module, steps: int, seed: int, device: str) -> dict[str, float]:
        """sample_label_accuracy without guidance and (when the model has a null label) with it."""
        labels = torch.arange(self.cfg.label_accuracy_samples) % self.shape.num_classes
        plain = self.generate(model, labels, 1.0, steps, seed, device)
        out = {"sample_label_accuracy": self.classifier.accuracy(plain, labels)}
        if self.cfg.class_dropout_prob > 0 and self.cfg.guidance_scale > 1:
            guided = self.generate(model, labels, self.cfg.guidance_scale, steps, seed, device)
            out["sample_label_accuracy_guided"] = self.classifier.accuracy(guided, labels)
        return out

    # -- description ------------------------------------------------------------------

    def describe(self, cfg: DiTConfig) -> str:
        if cfg.data_kind == "images":
            data = f"{cfg.image_size}x{cfg.image_size}x{cfg.channels} " + (str(cfg.data_dir) if cfg.data_dir else f"synthetic {cfg.synthetic_classes} classes")
        else:
            data = f"{cfg.seq_len} tokens x {cfg.token_features} features, synthetic {cfg.synthetic_classes} classes"
        return f"{cfg.arch_name}, {data}, DDIM {cfg.sampling_steps} steps, {cfg.max_epochs} epochs x batch {cfg.per_worker_batch_size}/worker"

    def num_parameters(self, cfg: DiTConfig) -> int:
        with torch.device("meta"):
            return count_parameters(build_dit(shape_of(cfg, len(class_names_of(cfg))), cfg.arch))

