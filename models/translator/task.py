"""The pose-to-text translator as a raylab task: data, model, loss, BLEU/ROUGE evaluation, samples.

    raylab train translator --stage quick --workers 0

Data is `data_dir` when set, else a synthetic dataset written once in the same
layout and read by the same loader. The tokenizer is the byte-level ByT5 one
(no files needed) or the one in `pretrained_dir`. Evaluation generates a
translation for every clip of the val split (each worker its share, gathered
before scoring) and reports BLEU-4, ROUGE-L, val loss and token accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from models.translator.config import TranslatorConfig
from models.translator.data import DataError, TranslationDataset, collate, read_split
from models.translator.metrics import score_translations
from models.translator.model import (
    PoseFrontEnd, Translator, apply_freezing, build_t5, format_counts, load_pretrained_t5, parameter_counts, sentence_loss,
)
from models.translator.synthetic import GENERATOR_VERSION, write_synthetic
from raylab.cache import cache_dir
from raylab.lr_schedules import warmup_then
from raylab.task import SampleOptions, TaskContext, TorchParts


def synthetic_root(cfg: TranslatorConfig):
    if cfg.synthetic_dir is not None:
        return cfg.synthetic_dir
    name = f"w{cfg.synthetic_words}-n{cfg.synthetic_train}-v{cfg.synthetic_val}-{cfg.synthetic_language}-s{cfg.synthetic_seed}-g{GENERATOR_VERSION}"
    return cache_dir("translator-synthetic", name)


def load_tokenizer(cfg: TranslatorConfig):
    if cfg.pretrained_dir is None:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    if not cfg.pretrained_dir.is_dir():
        raise DataError(f"pretrained_dir {cfg.pretrained_dir} is not a directory.")
    try:
        return AutoTokenizer.from_pretrained(str(cfg.pretrained_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"pretrained_dir {cfg.pretrained_dir} has no usable tokenizer ({exc}).") from None


def build_translator(cfg: TranslatorConfig, tokenizer, weights: bool = True) -> Translator:
    """The network a config describes, freezing policy applied (weights=False: a pretrained_dir's
    architecture without reading its weights, e.g. on the meta device)."""
    if cfg.pretrained_dir is not None:
        try:
            t5 = load_pretrained_t5(cfg.pretrained_dir, weights)
        except OSError as exc:
            raise DataError(f"pretrained_dir {cfg.pretrained_dir} holds no loadable model ({exc}).") from None
        except ValueError as exc:  # not a T5/mT5, or a config transformers cannot read
            raise DataError(str(exc)) from None
    else:
        vocab = cfg.vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            raise DataError(f"vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens.")
        t5 = build_t5(cfg, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id)
    frontend = PoseFrontEnd(
        t5.config.d_model, cfg.gcn_channels, cfg.gcn_blocks, cfg.gcn_temporal_kernel, cfg.gcn_norm,
        cfg.position_encoding, cfg.max_length,
    )
    model = Translator(frontend, t5)
    try:
        apply_freezing(model, cfg.freeze_encoder, cfg.frozen_decoder_blocks)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return model


def _meta_counts(cfg: TranslatorConfig) -> dict[str, dict[str, int]]:
    tokenizer = load_tokenizer(cfg)
    with torch.device("meta"):
        return parameter_counts(build_translator(cfg, tokenizer, weights=False))


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {
        "ids": batch["ids"], "mask": batch["mask"].to(device), "labels": batch["labels"].to(device),
        "parts": {k: v.to(device) for k, v in batch["parts"].items()},
    }


class TranslatorTask:
    config_cls = TranslatorConfig
    headline_metrics = ("loss", "token_accuracy", "bleu")

    def build(self, cfg: TranslatorConfig, ctx: TaskContext) -> TorchParts:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg)
        root = cfg.data_dir
        if root is None:
            root = write_synthetic(synthetic_root(cfg), cfg.synthetic_words, cfg.synthetic_train, cfg.synthetic_val,
                                   cfg.synthetic_seed, cfg.synthetic_language)

        def encode(text: str) -> list[int]:
            return self.tokenizer(text).input_ids  # T5 tokenizers end it with the EOS id

        common = dict(encode=encode, max_length=cfg.max_length, max_target_length=cfg.max_target_length,
                      seed=cfg.seed, threshold=cfg.confidence_threshold)
        train_data = TranslationDataset(read_split(root, cfg.train_split), split=cfg.train_split, train=True, **common)
        self.val_data = TranslationDataset(read_split(root, cfg.val_split), split=cfg.val_split, train=False, **common)
        model = build_translator(cfg, self.tokenizer).to(ctx.device)
        counts = parameter_counts(model)
        notices = [f"parameters trainable/total: {format_counts(counts)}",
                   f"truncation: {train_data.truncation.notice()}; {self.val_data.truncation.notice()}"]
        global_batch = cfg.per_worker_batch_size * ctx.world_size * cfg.grad_accum_steps
        if global_batch < cfg.min_global_batch:
            notices.append(f"global batch {global_batch} (per_worker_batch_size {cfg.per_worker_batch_size} x {ctx.world_size} worker(s) x "
                           f"grad_accum_steps {cfg.grad_accum_steps}) is below {cfg.min_global_batch}: seed 002 learned only with "
                           f"batch x accumulation >= 32; raise grad_accum_steps")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=0.9, weight_decay=cfg.optimizer_weight_decay)
        else:
            optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.optimizer_weight_decay)

        def make_scheduler(opt: torch.optim.Optimizer, total_steps: int):
            return warmup_then(opt, total_steps, cfg.warmup_steps, cfg.lr_schedule)

        metadata = {
            "tokenizer": "byt5" if cfg.pretrained_dir is None else f"pretrained:{cfg.pretrained_dir}",
            "vocab_size": model.t5.config.vocab_size,
            "parameters": counts,
            "truncation": {d.truncation.split: vars(d.truncation) for d in (train_data, self.val_data)},
            "notices": notices,
        }
        return TorchParts(model=model, optimizer=optimizer, train_data=train_data, make_scheduler=make_scheduler,
                          collate_fn=collate, metadata=metadata)

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["parts"], batch["mask"], batch["labels"])
        loss, accuracy = sentence_loss(logits, batch["labels"], self.cfg.label_smoothing)
        return loss, {"token_accuracy": accuracy}

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _translate(self, model: Translator, batch: dict[str, Any]) -> list[str]:
        ids = model.translate(batch["parts"], batch["mask"], self.cfg.num_beams, self.cfg.max_target_length)
        return self._decode(ids)

    def evaluate(self, model: torch.nn.Module, ctx: TaskContext) -> dict[str, float]:
        """Loss and token accuracy (teacher forcing) and generated-translation BLEU/ROUGE over the whole val split."""
        shard = Subset(self.val_data, range(ctx.world_rank, len(self.val_data), ctx.world_size))
        # A private generator: iterating a DataLoader draws a seed from torch's global RNG otherwise,
        # and a run that evaluates before a checkpoint (a max_steps stop) would resume on other dropout masks.
        loader = DataLoader(shard, batch_size=self.cfg.eval_batch_size, collate_fn=collate,
                            num_workers=self.cfg.data_loader_workers, generator=torch.Generator())
        sums = {"loss": 0.0, "sentences": 0.0, "correct": 0.0, "tokens": 0.0}
        mine: list[tuple[str, str]] = []
        for batch in loader:
            batch = _to_device(batch, ctx.device)
            logits = model(batch["parts"], batch["mask"], batch["labels"])
            loss, accuracy = sentence_loss(logits, batch["labels"], self.cfg.label_smoothing)
            tokens = float((batch["labels"] != -100).sum())
            n = len(batch["ids"])
            sums["loss"] += float(loss) * n
            sums["sentences"] += n
            sums["correct"] += float(accuracy) * tokens
            sums["tokens"] += tokens
            mine.extend(zip(batch["ids"], self._translate(model, batch)))
        total = ctx.all_reduce_sum(sums)
        predictions = dict(pair for part in ctx.all_gather_object(mine) for pair in part)
        references = {e.id: e.text for e in self.val_data.examples}
        ids = [i for i in references if i in predictions]
        scores = score_translations([predictions[i] for i in ids], [references[i] for i in ids], self.cfg.bleu_tokenize)
        return {
            "loss": total["loss"] / max(total["sentences"], 1.0),
            "token_accuracy": total["correct"] / max(total["tokens"], 1.0),
            "bleu": scores.bleu,
            "rouge_l": scores.rouge_l,
            "sentences": float(len(ids)),  # translations scored: the whole split, gathered from every worker
        }

    def sample(self, model: torch.nn.Module, n: int, ctx: TaskContext, options: SampleOptions | None = None) -> list[dict[str, Any]]:
        """Translations of the first n val clips (all of them if n is larger), next to their references."""
        n = min(n, len(self.val_data))
        if n <= 0:
            return []
        out: list[dict[str, Any]] = []
        for start in range(0, n, self.cfg.eval_batch_size):
            batch = _to_device(collate([self.val_data[i] for i in range(start, min(n, start + self.cfg.eval_batch_size))]), ctx.device)
            for j, (sample_id, prediction) in enumerate(zip(batch["ids"], self._translate(model, batch))):
                out.append({"id": sample_id, "prediction": prediction, "reference": self.val_data.examples[start + j].text})
        return out

    def describe(self, cfg: TranslatorConfig) -> str:
        t5 = f"pretrained {cfg.pretrained_dir}" if cfg.pretrained_dir else (
            f"{cfg.t5_class} d{cfg.d_model} {cfg.encoder_layers}+{cfg.decoder_layers} layers")
        encoder = "encoder frozen" if cfg.freeze_encoder else "encoder trains"
        data = str(cfg.data_dir) if cfg.data_dir else f"synthetic {cfg.synthetic_words} words ({cfg.synthetic_language})"
        counts = _meta_counts(cfg)
        trainable = sum(c["trainable"] for c in counts.values())
        total = sum(c["total"] for c in counts.values())
        return (f"GCN {cfg.gcn_blocks}x{cfg.gcn_channels} -> {t5}; {encoder}, {cfg.frozen_decoder_blocks} decoder blocks frozen; "
                f"{trainable:,} of {total:,} parameters train; {data}")

    def num_parameters(self, cfg: TranslatorConfig) -> int:
        return sum(c["total"] for c in _meta_counts(cfg).values())
