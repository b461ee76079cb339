"""Configuration of the pose-to-text translator (seed 002), validated by pydantic.

Every field has a description; `raylab train translator --set key=value`
overrides any of them and `experiments/translator.yaml` holds the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from models.translator.synthetic import MAX_WORDS
from raylab.config import TrainConfig


class TranslatorConfig(TrainConfig):
    # The loop's field, described again with seed 002's advice.
    grad_accum_steps: int = Field(
        1, gt=0, description="Micro-batches accumulated per optimizer step; seed 002's advice: per_worker_batch_size x workers x this >= 32 (e.g. batch 2 x 16 when memory is short)."
    )
    min_global_batch: int = Field(
        32, ge=0, description="The run starts with a notice when per_worker_batch_size x workers x grad_accum_steps is below this (seed 002's rule: 32); 0: no notice."
    )

    # Data
    data_dir: Path | None = Field(None, description="A dataset folder: <split>.tsv files of '<id><TAB><text>' lines and poses/<id>.npy|.pkl|<id>/ (OpenPose JSON); None: a synthetic dataset in that layout.")
    train_split: str = Field("train", description="Split file (without .tsv) trained on.")
    val_split: str = Field("dev", description="Split file (without .tsv) evaluated and sampled from.")
    max_length: int = Field(256, ge=4, description="Frames per clip; longer clips are subsampled to this many sorted frames (random in training, evenly spaced in evaluation), not cut.")
    max_target_length: int = Field(128, ge=2, description="Target tokens per sentence, end-of-sequence included; longer targets are cut (counted and reported), and generation stops here.")
    confidence_threshold: float = Field(0.3, ge=0, lt=1, description="Joints with a score at or below this are set to 0; the body square is fitted to the joints above it.")
    synthetic_dir: Path | None = Field(None, description="Where the synthetic dataset is written (None: <raylab cache>/translator-synthetic/<its parameters>; the cache is $RAYLAB_CACHE_DIR, else ~/.cache/raylab).")
    synthetic_words: int = Field(16, ge=4, le=MAX_WORDS, description="Vocabulary of the synthetic sign language (each word a fixed motion).")
    synthetic_train: int = Field(800, gt=0, description="Synthetic training sentences (4-6 words each).")
    synthetic_val: int = Field(80, gt=0, description="Synthetic dev (and test) sentences.")
    synthetic_language: Literal["en", "zh"] = Field("en", description="Language of the synthetic sentences: English words, or Chinese words written without spaces.")
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic data (separate from `seed`, so a new training seed reuses the data).")

    # Front end
    gcn_channels: int = Field(64, gt=0, description="Channels of every ST-GCN block (per body part).")
    gcn_blocks: int = Field(2, ge=1, description="ST-GCN blocks per body part (the seed had 2; Uni-Sign uses 6).")
    gcn_temporal_kernel: int = Field(5, ge=1, description="Frames seen by each block's temporal convolution (odd).")
    gcn_norm: Literal["batch", "none"] = Field("batch", description="Normalisation in the ST-GCN blocks: BatchNorm, or none (no batch statistics, so gradient accumulation is exactly a bigger batch).")
    position_encoding: Literal["none", "sinusoidal", "learned"] = Field("sinusoidal", description="Temporal position encoding added after the projection into the T5 width (seed 002: T5's relative bias alone gave no explicit timing).")

    # T5 / mT5
    pretrained_dir: Path | None = Field(None, description="A local Hugging Face T5/mT5 directory (config, weights and tokenizer, from save_pretrained); its dimensions replace the t5 fields below. None: build from those fields with the byte-level ByT5 tokenizer.")
    t5_class: Literal["t5", "mt5"] = Field("t5", description="transformers class built from the config: T5ForConditionalGeneration or MT5ForConditionalGeneration (same architecture).")
    d_model: int = Field(512, gt=0, description="T5 width (mT5-small: 512).")
    d_kv: int = Field(64, gt=0, description="Width of each attention head (mT5-small: 64).")
    d_ff: int = Field(1024, gt=0, description="Feed-forward width (mT5-small: 1024).")
    encoder_layers: int = Field(8, ge=1, description="Encoder blocks (mT5-small: 8).")
    decoder_layers: int = Field(8, ge=1, description="Decoder blocks (mT5-small: 8).")
    num_heads: int = Field(6, ge=1, description="Attention heads (mT5-small: 6).")
    feed_forward: Literal["relu", "gated-gelu"] = Field("gated-gelu", description="Feed-forward kind: T5's relu or mT5/T5 v1.1's gated-gelu.")
    vocab_size: int | None = Field(None, gt=0, description="Embedding rows (mT5: 250,112); None: the tokenizer's size (384 for ByT5). Must cover the tokenizer.")
    tie_embeddings: bool = Field(False, description="Share the LM head with the token embeddings (original T5); False: a separate head, as mT5 and T5 v1.1.")
    dropout: float = Field(0.1, ge=0, lt=1, description="T5 dropout rate.")

    # Training policy (seed 002)
    freeze_encoder: bool = Field(False, description="Freeze the whole T5 encoder. Seed 002's bug: a frozen text encoder cannot adapt to pose features (loss 7, accuracy 0%).")
    frozen_decoder_blocks: int = Field(0, ge=0, description="Freeze the first N decoder blocks (seed 002's fix: 4 of mT5-small's 8, with pretrained weights). The LM head and the decoder's final norm always train.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing (0.1-0.2 usual; seed 002: it can hide a model stuck at a uniform prediction, so watch token accuracy too).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW (seed 002: lr 1e-4 to 2e-4 once the encoder trains), or SGD with momentum 0.9, whose update scales with the gradient (used to check accumulation exactly).")
    optimizer_weight_decay: float = Field(0.01, ge=0, description="Weight decay of the optimizer.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="Learning-rate schedule after warm-up, over the run's optimizer steps.")

    # Evaluation
    num_beams: int = Field(4, ge=1, description="Beam width when generating translations (1: greedy).")
    bleu_tokenize: Literal["13a", "zh"] = Field("13a", description="sacreBLEU tokenizer for BLEU-4 and ROUGE-L: 13a for English, zh for Chinese (characters).")

    @model_validator(mode="after")
    def _consistent(self) -> "TranslatorConfig":
        if self.gcn_temporal_kernel % 2 == 0:
            raise ValueError(f"gcn_temporal_kernel must be odd so frames stay aligned (got {self.gcn_temporal_kernel})")
        if self.pretrained_dir is None and self.frozen_decoder_blocks > self.decoder_layers:
            raise ValueError(f"frozen_decoder_blocks ({self.frozen_decoder_blocks}) exceeds decoder_layers ({self.decoder_layers})")
        if self.data_dir is None and self.synthetic_language == "zh" and self.bleu_tokenize != "zh":
            raise ValueError("synthetic_language zh needs bleu_tokenize zh (13a would score each unspaced Chinese sentence as one token)")
        return self
