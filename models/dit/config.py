"""Configuration of the DiT diffusion model (seed 000), validated by pydantic.

Every field has a description; `raylab train dit --set key=value` overrides any
of them; `experiments/dit.yaml` (images) and `experiments/dit_tokens.yaml`
(token sequences, `--experiment experiments/dit_tokens.yaml`) hold the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from models.dit.model import ARCHITECTURES, DiTArch, arch_of
from raylab.config import TrainConfig

Architecture = Literal[ARCHITECTURES + ("custom",)]  # type: ignore[valid-type]


class DiTConfig(TrainConfig):
    # -- data -------------------------------------------------------------------
    data_kind: Literal["images", "tokens"] = Field("images", description="What the model generates: square images, or 1-D token sequences with token_features features per token (seed 000).")
    data_dir: Path | None = Field(None, description="An ImageFolder of real images (DIR/<class>/<image>.png|jpg|jpeg; classes = sorted subfolder names); None: synthetic data.")
    image_size: int = Field(8, ge=4, le=512, description="Images are resized to this many pixels square.")
    channels: Literal[1, 3] = Field(1, description="Image channels: 1 (grayscale) or 3 (RGB); images are converted to this.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of each image class held out (deterministically) for validation.")
    seq_len: int = Field(16, ge=1, description="Tokens per sequence (data_kind tokens).")
    token_features: int = Field(8, ge=1, description="Features per token (data_kind tokens; seed 000 had 8).")
    synthetic_classes: int = Field(10, ge=2, description="Classes of the synthetic data.")
    synthetic_per_class: int = Field(200, ge=2, description="Synthetic samples per class (images: PNG files, split by val_fraction; tokens: training sequences).")
    synthetic_val_per_class: int = Field(10, ge=1, description="Validation sequences per class of the synthetic token data.")
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic data (separate from `seed`, so a new training seed reuses the data).")
    synthetic_dir: Path | None = Field(None, description="Where synthetic images are written (None: <raylab cache>/dit-synthetic/<their parameters>).")
    # -- model ------------------------------------------------------------------
    architecture: Architecture = Field("DiT-S/2", description="DiT size and patch size as in the paper (DiT-S/B/L/XL with patch 2/4/8; /1 = one token per position), or 'custom' with depth, hidden_size, num_heads and patch_size.")
    depth: int | None = Field(None, ge=1, description="Transformer blocks (architecture custom only).")
    hidden_size: int | None = Field(None, ge=2, description="Token width D (architecture custom only); even, divisible by num_heads.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads (architecture custom only).")
    patch_size: int | None = Field(None, ge=1, description="Patch side in pixels, or tokens per patch (architecture custom only).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP width as a multiple of the token width.")
    class_dropout_prob: float = Field(0.1, ge=0, lt=1, description="Probability a training label is replaced by the null label (classifier-free guidance; 0 disables guidance).")
    learn_sigma: bool = Field(True, description="Also predict the variance (output 2 x channels) and train it with the variational-bound term.")
    # -- diffusion ----------------------------------------------------------------
    diffusion_steps: int = Field(1000, ge=2, description="Steps of the forward (noising) process.")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="First beta of the linear noise schedule.")
    beta_end: float = Field(0.02, gt=0, lt=1, description="Last beta of the linear noise schedule.")
    sampling_steps: int = Field(10, ge=1, description="DDIM steps per sample (spaced evenly over the diffusion steps).")
    ddim_eta: float = Field(0.0, ge=0, description="DDIM eta: 0 = deterministic sampling.")
    guidance_scale: float = Field(4.0, ge=1, description="Classifier-free guidance scale of guided samples (1: no guidance).")
    clip_denoised: bool = Field(True, description="Clip each step's predicted clean sample to the data range [-1, 1].")
    # -- sampling rounds and optimisation ----------------------------------------
    label_accuracy_samples: int = Field(100, ge=0, description="Samples generated per sampling round (cycling through classes) to measure sample_label_accuracy, with and without guidance (0: skip).")
    sample_seed: int = Field(0, ge=0, description="Noise seed of every sampling round, so rounds are comparable and reproducible.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (the reference uses 0).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps (then constant, as in the reference).")

    @model_validator(mode="after")
    def _check_shapes(self) -> "DiTConfig":
        custom = {k: getattr(self, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
        if self.architecture == "custom":
            missing = [k for k, v in custom.items() if v is None]
            if missing:
                raise ValueError(f"architecture 'custom' needs {', '.join(missing)}")
        elif any(v is not None for v in custom.values()):
            given = ", ".join(k for k, v in custom.items() if v is not None)
            raise ValueError(f"{given} only apply to architecture 'custom', not '{self.architecture}'")
        arch = self.arch
        if arch.hidden_size % arch.num_heads or arch.hidden_size % 4:
            raise ValueError(f"hidden_size {arch.hidden_size} must be divisible by num_heads ({arch.num_heads}) and by 4 (sin-cos table)")
        size = self.image_size if self.data_kind == "images" else self.seq_len
        if size % arch.patch_size:
            what = "image_size" if self.data_kind == "images" else "seq_len"
            raise ValueError(f"{what} {size} is not divisible by patch size {arch.patch_size}")
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end {self.beta_end} is below beta_start {self.beta_start}")
        if self.sampling_steps > self.diffusion_steps:
            raise ValueError(f"sampling_steps {self.sampling_steps} exceeds diffusion_steps {self.diffusion_steps}")
        if self.data_kind == "tokens" and self.data_dir is not None:
            raise ValueError("data_dir holds images; token sequences are synthetic only (data_kind images for a folder)")
        return self

    @property
    def arch(self) -> DiTArch:
        extra = dict(mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob, learn_sigma=self.learn_sigma)
        if self.architecture == "custom":
            return DiTArch(self.depth, self.hidden_size, self.num_heads, self.patch_size, **extra)
        return arch_of(self.architecture, **extra)

    @property
    def arch_name(self) -> str:
        a = self.arch
        return self.architecture if self.architecture != "custom" else f"DiT {a.depth}x{a.hidden_size}x{a.num_heads}h/{a.patch_size}"
