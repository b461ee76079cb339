"""The translator network: a spatial-temporal GCN front end per body part feeding
the `inputs_embeds` of a transformers T5/mT5 encoder-decoder, and seed 002's
freezing policies.

    parts (B, T, V, 3) per part --Linear--> ST-GCN blocks --mean over joints--> (B, T, C)
    concat 4 parts (B, T, 4C) --Linear, LayerNorm--> (B, T, d_model) + optional position encoding
    --> T5 encoder (inputs_embeds, frame mask) --> T5 decoder --> LM head

Each ST-GCN block (as in Uni-Sign's `stgcn_block.py`): a 1x1 conv, a learnable
adjacency initialised from the part's skeleton graph, norm + ReLU, a temporal
conv over frames, norm, a residual, ReLU. Padded frames are zeroed before each
temporal conv, so a clip's features do not depend on how much the batch padded
it (the same as the conv's own zero padding).

The T5 is built from a `transformers` config (nothing downloaded) or loaded from
a local Hugging Face directory (`pretrained_dir`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.translator.keypoints import PART_NAMES, skeleton_adjacency

# Groups of parameters the run reports and the freezing policy acts on.
MODULE_GROUPS = ("frontend", "encoder", "decoder", "decoder_final_norm", "token_embeddings", "lm_head")


class STGCNBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, adjacency: torch.Tensor, temporal_kernel: int, norm: str) -> None:
        super().__init__()
        make_norm = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else (lambda c: nn.Identity())
        self.spatial = nn.Conv2d(channels_in, channels_out, 1)
        self.adjacency = nn.Parameter(adjacency.clone())
        self.norm_spatial = make_norm(channels_out)
        self.temporal = nn.Conv2d(channels_out, channels_out, (temporal_kernel, 1), padding=(temporal_kernel // 2, 0))
        self.norm_temporal = make_norm(channels_out)
        self.residual = nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T, V); mask: (B, 1, T, 1), 1 for real frames."""
        y = torch.einsum("bctv,vw->bctw", self.spatial(x), self.adjacency)
        y = torch.relu(self.norm_spatial(y)) * mask
        y = self.norm_temporal(self.temporal(y))
        return torch.relu(y + self.residual(x)) * mask


class PartEncoder(nn.Module):
    """One body part: (B, T, V, 3) joints -> (B, T, C) features."""

    def __init__(self, part: str, channels: int, blocks: int, temporal_kernel: int, norm: str) -> None:
        super().__init__()
        adjacency = torch.from_numpy(skeleton_adjacency(part))
        self.embed = nn.Linear(3, channels)
        self.blocks = nn.ModuleList(STGCNBlock(channels, channels, adjacency, temporal_kernel, norm) for _ in range(blocks))

    def forward(self, joints: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        mask = frame_mask[:, None, :, None]
        x = self.embed(joints).permute(0, 3, 1, 2) * mask  # (B, C, T, V)
        for block in self.blocks:
            x = block(x, mask)
        return x.mean(dim=-1).transpose(1, 2)


def sinusoidal_encoding(length: int, width: int) -> torch.Tensor:
    """(length, width) sine/cosine position encoding (Vaswani et al.)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rates = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    out = torch.zeros(length, width)
    out[:, 0::2] = torch.sin(position * rates)
    out[:, 1::2] = torch.cos(position * rates[: width // 2])
    return out


class PoseFrontEnd(nn.Module):
    """Four part encoders, concatenated and projected to the T5 width, plus a temporal position encoding."""

    def __init__(self, d_model: int, channels: int, blocks: int, temporal_kernel: int, norm: str,
                 position_encoding: str, max_length: int) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({p: PartEncoder(p, channels, blocks, temporal_kernel, norm) for p in PART_NAMES})
        self.project = nn.Linear(channels * len(PART_NAMES), d_model)
        # Unit-scale features before the position encoding is added: raw projections are ~0.1, and a
        # sinusoid of amplitude 1 on top would drown the pose content in the encoder's input.
        self.norm = nn.LayerNorm(d_model)
        self.position_encoding = position_encoding
        self.learned_positions = nn.Embedding(max_length, d_model) if position_encoding == "learned" else None
        if self.learned_positions is not None:
            nn.init.normal_(self.learned_positions.weight, std=0.02)

    def forward(self, parts: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        features = torch.cat([self.parts[p](parts[p], mask) for p in PART_NAMES], dim=-1)
        x = self.norm(self.project(features))
        frames = x.shape[1]
        if self.position_encoding == "sinusoidal":
            x = x + sinusoidal_encoding(frames, x.shape[-1]).to(x)
        elif self.learned_positions is not None:
            x = x + self.learned_positions(torch.arange(frames, device=x.device))
        return x * mask[..., None]


class Translator(nn.Module):
    """Pose front end + (m)T5. `forward` gives logits for teacher forcing; `translate` generates token ids."""

    def __init__(self, frontend: PoseFrontEnd, t5: nn.Module) -> None:
        super().__init__()
        self.frontend = frontend
        self.t5 = t5

    def forward(self, parts: dict[str, torch.Tensor], mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeds = self.frontend(parts, mask)
        decoder_inputs = self.t5._shift_right(labels)  # start token, then the labels; -100 becomes pad
        out = self.t5(inputs_embeds=embeds, attention_mask=mask.long(), decoder_input_ids=decoder_inputs, use_cache=False)
        return out.logits

    @torch.no_grad()
    def translate(self, parts: dict[str, torch.Tensor], mask: torch.Tensor, num_beams: int, max_new_tokens: int) -> torch.Tensor:
        embeds = self.frontend(parts, mask)
        return self.t5.generate(
            inputs_embeds=embeds, attention_mask=mask.long(), num_beams=num_beams, max_new_tokens=max_new_tokens,
            do_sample=False,
        )


def t5_config(cfg, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import MT5Config, T5Config

    cls = MT5Config if cfg.t5_class == "mt5" else T5Config
    return cls(
        vocab_size=vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward,
        dropout_rate=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, decoder_start_token_id=pad_id,
        pad_token_id=pad_id, eos_token_id=eos_id,
    )


def build_t5(cfg, vocab_size: int, pad_id: int, eos_id: int) -> nn.Module:
    """A freshly initialised T5/mT5 of the config's dimensions."""
    from transformers import MT5ForConditionalGeneration, T5ForConditionalGeneration

    model_cls = MT5ForConditionalGeneration if cfg.t5_class == "mt5" else T5ForConditionalGeneration
    model = model_cls(t5_config(cfg, vocab_size, pad_id, eos_id))
    if not cfg.tie_embeddings:
        # transformers 5 always ties the LM head to the token embeddings; mT5 and T5 v1.1 have
        # their own head, which is what tie_embeddings=False asks for. Without the tied head's
        # d_model^-0.5 output scaling, std d_model^-0.5 keeps the first logits near unit scale
        # (std 1, transformers' choice for a head meant to be loaded, starts at loss ~20).
        head = nn.Parameter(torch.empty_like(model.lm_head.weight))
        nn.init.normal_(head, std=cfg.d_model ** -0.5)
        model.lm_head.weight = head
    return model


def load_pretrained_t5(directory: Path, weights: bool = True) -> nn.Module:
    """The T5/mT5 saved in `directory`; with weights=False only its architecture (for counting parameters)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    if weights:
        model = AutoModelForSeq2SeqLM.from_pretrained(str(directory), local_files_only=True)
    else:
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(str(directory), local_files_only=True))
    if model.config.model_type not in ("t5", "mt5"):
        raise ValueError(f"pretrained_dir {directory} holds a {model.config.model_type} model; expected t5 or mt5.")
    return model


def module_group(name: str) -> str:
    """Which of MODULE_GROUPS a parameter (named as in Translator.named_parameters) belongs to."""
    if name.startswith("frontend."):
        return "frontend"
    if name.startswith("t5.encoder."):
        return "encoder"
    if name.startswith("t5.decoder.final_layer_norm"):
        return "decoder_final_norm"
    if name.startswith("t5.decoder."):
        return "decoder"
    if name.startswith("t5.lm_head"):
        return "lm_head"
    if name.startswith("t5.shared"):
        return "token_embeddings"
    raise ValueError(f"parameter {name} belongs to no module group")


def apply_freezing(model: Translator, freeze_encoder: bool, frozen_decoder_blocks: int) -> None:
    """Seed 002's policy: the encoder (all of it) and the first N decoder blocks may be frozen;
    the front end, the rest of the decoder, its final norm and the LM head always train."""
    blocks = len(model.t5.decoder.block)
    if frozen_decoder_blocks > blocks:
        raise ValueError(f"frozen_decoder_blocks is {frozen_decoder_blocks} but the decoder has only {blocks} blocks.")
    frozen_prefixes = tuple(f"t5.decoder.block.{i}." for i in range(frozen_decoder_blocks))
    for name, param in model.named_parameters():
        group = module_group(name)
        frozen = (group == "encoder" and freeze_encoder) or name.startswith(frozen_prefixes)
        param.requires_grad_(not frozen)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{group: {"trainable": n, "total": n}} over MODULE_GROUPS (tied weights counted once)."""
    counts = {g: {"trainable": 0, "total": 0} for g in MODULE_GROUPS}
    for name, param in model.named_parameters():
        entry = counts[module_group(name)]
        entry["total"] += param.numel()
        entry["trainable"] += param.numel() if param.requires_grad else 0
    return counts


def format_counts(counts: dict[str, dict[str, int]]) -> str:
    """`frontend 52.1K/52.1K, encoder 0/98.6K, ...` (trainable/total), groups with no parameters left out."""
    def short(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.1f}{unit}"
        return str(n)

    return ", ".join(f"{g} {short(c['trainable'])}/{short(c['total'])}" for g, c in counts.items() if c["total"])


def sentence_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over each sentence's tokens, then over sentences; and token accuracy.

    Averaging per sentence first gives every sentence the same weight whatever
    its length, which also makes a mean over micro-batches equal the mean over
    their union, so gradient accumulation of 4 x 2 equals a batch of 8.
    """
    valid = labels != -100
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    per_sentence = per_token.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    correct = ((logits.argmax(dim=-1) == labels) & valid).sum()
    return per_sentence.mean(), correct.float() / valid.sum().clamp(min=1)
