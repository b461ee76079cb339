"""Configuration of GMAN traffic forecasting (seed 001), validated by pydantic.

Every field has a description; `raylab train gman --set key=value` overrides
any of them and `experiments/gman.yaml` holds the quick / medium / full stages.
Field names follow the reference (zhengchuanpan/GMAN): L blocks, K heads of d
dimensions, P history and Q predicted steps, `decay_epoch`, `patience`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from raylab.config import TrainConfig

MINUTES_PER_DAY = 24 * 60


class GmanConfig(TrainConfig):
    # The size of the model: D = K * d features everywhere.
    L: int = Field(1, ge=1, description="ST-attention blocks in the encoder and again in the decoder (reference default 1; paper 3; seed stages 2 / 3 / 5).")
    K: int = Field(8, ge=1, description="Attention heads.")
    d: int = Field(8, ge=1, description="Dimensions of each attention head; the model width is D = K * d.")
    P: int = Field(12, ge=1, description="History steps fed to the model (12 x 5 min = 1 hour).")
    Q: int = Field(12, ge=1, description="Future steps predicted (12 x 5 min = 1 hour); horizon metrics need Q >= 12.")
    se_dims: int = Field(64, ge=1, description="Dimensions of the spatial embedding (node2vec files have 64); an se_path file must have this many.")
    time_slot_minutes: int = Field(5, ge=1, le=MINUTES_PER_DAY, description="Minutes between rows of the data file; the time-of-day one-hot has 1440 / this many slots (288 for 5 minutes).")
    temporal_causal_mask: bool = Field(False, description="Mask future steps in temporal attention (False as in the reference's PeMS model; its METR-LA model uses True).")
    output_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before each output FC layer (0 as in the reference's PeMS model; its METR-LA model uses 0.1).")
    bn_momentum: float = Field(0.9, gt=0, lt=1, description="BatchNorm moving-average momentum (the reference ramps it 0.5 -> 0.99 as the lr decays; fixed here).")
    sync_batchnorm: bool = Field(True, description="BatchNorm statistics over the global batch across workers, so N workers x batch B trains like 1 worker x batch N*B and every worker keeps the same moving statistics.")

    # The recipe of the reference's train.py.
    decay_epoch: int = Field(5, ge=1, description="Epochs between learning-rate decays (staircase x lr_decay_rate); the reference's 5 decays fast for large models, the seed uses 8 for medium.")
    lr_decay_rate: float = Field(0.7, gt=0, le=1, description="Learning-rate factor applied every decay_epoch epochs.")
    min_lr: float = Field(1e-5, ge=0, description="Floor of the decayed learning rate.")
    patience: int = Field(10, ge=1, description="Stop after this many evaluations without a new best validation MAE (the reference's early stopping).")
    xla: bool = Field(False, description="Compile the training step with XLA (tf.function jit_compile); the seed turns it on from the medium stage.")

    # Data: a real file, or a synthetic one written in the same format.
    data_path: Path | None = Field(None, description="METR-LA / PeMS-Bay pandas HDF5 file (key 'df': 5-minute DatetimeIndex rows, one column per sensor, 0 = missing); None: a synthetic file in that format.")
    se_path: Path | None = Field(None, description="node2vec spatial-embedding text file ('N dims' line, then 'index v1 ... vdims' per sensor); None: with data_path, a spectral embedding of the sensors' correlation graph; with synthetic data, the generator's SE file.")
    train_ratio: float = Field(0.7, gt=0, lt=1, description="Leading fraction of the time steps used for training (time-ordered split).")
    test_ratio: float = Field(0.2, gt=0, lt=1, description="Trailing fraction of the time steps held out for testing; validation is what lies between.")
    synthetic_sensors: int = Field(10, ge=2, le=64, description="Sensors of the synthetic road network (a chain: rush hours travel downstream).")
    synthetic_days: int = Field(21, ge=7, description="Days of synthetic 5-minute data, starting on a Monday.")
    synthetic_seed: int = Field(0, ge=0, description="Seed of the synthetic data (separate from `seed`, so a new training seed reuses the data).")
    synthetic_dir: Path | None = Field(None, description="Where the synthetic files are written (None: <raylab cache>/gman-synthetic/<its parameters>; the cache is $RAYLAB_CACHE_DIR, else ~/.cache/raylab).")

    @property
    def D(self) -> int:
        """Model width: K heads x d dimensions."""
        return self.K * self.d

    @property
    def steps_per_day(self) -> int:
        """Time-of-day slots (T in the reference): 288 for 5-minute data."""
        return MINUTES_PER_DAY // self.time_slot_minutes

    @model_validator(mode="after")
    def _check_split_and_slots(self) -> "GmanConfig":
        if self.train_ratio + self.test_ratio >= 1:
            raise ValueError(
                f"train_ratio ({self.train_ratio}) + test_ratio ({self.test_ratio}) must be below 1 to leave a validation split"
            )
        if MINUTES_PER_DAY % self.time_slot_minutes:
            raise ValueError(f"time_slot_minutes ({self.time_slot_minutes}) must divide a day (1440 minutes)")
        return self
