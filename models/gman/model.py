"""GMAN (Graph Multi-Attention Network, Zheng et al., AAAI 2020) in Keras 3.

Written from the reference's structure (zhengchuanpan/GMAN, `PeMS/model.py`,
`PeMS/tf_utils.py`); shapes are [batch, steps, nodes, features] throughout:

    X[B,P,N] -> FC[D relu, D] -> L encoder ST-attention blocks (with STE of the
    P history steps) -> transform attention (history -> future) -> L decoder
    blocks (with STE of the Q future steps) -> FC[D relu, 1] -> [B,Q,N]

Every "FC" of the reference is a 1x1 convolution, i.e. a Dense on the last
axis (Glorot-uniform kernel, zero bias), followed by BatchNorm and the
activation when there is an activation. Counting trainable variables (BN's
gamma and beta included, its moving statistics not) reproduces the seed's
figures: 30,993 (L2 K4 d4), 187,885 (L3 K6 d6), 900,801 (L5 K8 d8). The count
does not depend on the number of sensors N; it assumes 64-dimensional SE and
288 time-of-day slots (5-minute data).

The model takes raw readings and returns raw predictions: the spatial
embedding and the training split's mean/std are non-trainable variables, so a
checkpoint alone can forecast. Every layer has an explicit name, so variable
paths (`gman/encoder_0/spatial/query/dense_0/kernel`) are the same in every
process and at every size: checkpoints and warm starts match by path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from models.gman.config import GmanConfig

DAYS_PER_WEEK = 7
# The reference fills masked attention scores with this before the softmax.
_MASKED_SCORE = -(2.0**15) + 1


class SeededDropout(keras.layers.Layer):
    """Dropout whose seed generator has a stable, nested variable path.

    `keras.layers.Dropout` names its generator `seed_generator_<global count>`
    at the top level, which differs between model sizes and processes.
    """

    def __init__(self, rate: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed

    def build(self, input_shape) -> None:
        # Created in build, inside this layer's name scope: path <layer path>/seed/seed_generator_state.
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="seed")

    def call(self, x, training: bool = False):
        if not training or self.rate == 0:
            return x
        return keras.random.dropout(x, self.rate, seed=self.seed_generator)


class FC(keras.layers.Layer):
    """The reference's FC: Dense layers on the last axis, BatchNorm + activation where there is an activation."""

    def __init__(self, units: Sequence[int], activations: Sequence[str | None], cfg: GmanConfig,
                 use_bias: bool = True, dropout: float = 0.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if len(units) != len(activations):
            raise ValueError(f"FC {self.name}: {len(units)} units but {len(activations)} activations")
        self.steps = []
        for i, (width, activation) in enumerate(zip(units, activations)):
            drop = SeededDropout(dropout, seed + i, name=f"dropout_{i}") if dropout > 0 else None
            dense = keras.layers.Dense(
                width, use_bias=use_bias, kernel_initializer="glorot_uniform", bias_initializer="zeros", name=f"dense_{i}"
            )
            norm = None
            if activation is not None:
                # epsilon 1e-3 as the reference's batch_norm; synchronized: global-batch statistics under a strategy.
                norm = keras.layers.BatchNormalization(
                    momentum=cfg.bn_momentum, epsilon=1e-3, synchronized=cfg.sync_batchnorm, name=f"batch_norm_{i}"
                )
            self.steps.append((drop, dense, norm, keras.activations.get(activation) if activation else None))

    def build(self, input_shape) -> None:
        # Explicit builds create the variables from shapes alone: no graph is traced, so
        # counting parameters of the full model takes a fraction of a second.
        shape = tuple(input_shape)
        for drop, dense, norm, _ in self.steps:
            if drop is not None:
                drop.build(shape)
            dense.build(shape)
            shape = shape[:-1] + (dense.units,)
            if norm is not None:
                norm.build(shape)

    def call(self, x, training: bool = False):
        for drop, dense, norm, activation in self.steps:
            if drop is not None:
                x = drop(x, training=training)
            x = dense(x)
            if norm is not None:
                x = activation(norm(x, training=training))
        return x


def _features(width: int) -> tuple:
    """The [batch, steps, nodes, width] shape every FC sees."""
    return (None, None, None, width)


def _heads(x, K: int):
    """[B,T,N,K*d] -> [B,K,T,N,d]."""
    b, t, n, width = ops.shape(x)
    return ops.transpose(ops.reshape(x, (-1, t, n, K, width // K)), (0, 3, 1, 2, 4))


def _merge_heads(x):
    """[B,K,T,N,d] -> [B,T,N,K*d]."""
    _, k, t, n, d = ops.shape(x)
    return ops.reshape(ops.transpose(x, (0, 2, 3, 1, 4)), (-1, t, n, k * d))


def _attend(query, key, value, d: int, causal: bool = False):
    """softmax(QK^T / sqrt(d)) V over the second-to-last axis of key/value."""
    scores = ops.matmul(query, ops.swapaxes(key, -1, -2)) / math.sqrt(d)
    if causal:
        steps_q, steps_k = ops.shape(scores)[-2], ops.shape(scores)[-1]
        allowed = ops.tril(ops.ones((steps_q, steps_k), dtype="bool"))
        scores = ops.where(allowed, scores, _MASKED_SCORE)
    return ops.matmul(ops.softmax(scores, axis=-1), value)


class _QKV(keras.layers.Layer):
    """Query, key and value projections FC(D, relu) plus the output FC[D relu, D]."""

    def __init__(self, cfg: GmanConfig, input_width: int, **kwargs):
        super().__init__(**kwargs)
        self.K, self.d, self.input_width = cfg.K, cfg.d, input_width
        self.query = FC((cfg.D,), ("relu",), cfg, name="query")
        self.key = FC((cfg.D,), ("relu",), cfg, name="key")
        self.value = FC((cfg.D,), ("relu",), cfg, name="value")
        self.out = FC((cfg.D, cfg.D), ("relu", None), cfg, name="output")

    def build(self, input_shape) -> None:
        for fc in (self.query, self.key, self.value):
            fc.build(_features(self.input_width))
        self.out.build(_features(self.K * self.d))


class SpatialAttention(_QKV):
    """Each node attends to every node at the same time step (dynamic spatial correlations)."""

    def __init__(self, cfg: GmanConfig, **kwargs):
        super().__init__(cfg, 2 * cfg.D, **kwargs)

    def call(self, x, ste, training: bool = False):
        h = ops.concatenate([x, ste], axis=-1)
        q, k, v = (_heads(fc(h, training=training), self.K) for fc in (self.query, self.key, self.value))
        return self.out(_merge_heads(_attend(q, k, v, self.d)), training=training)


class TemporalAttention(_QKV):
    """Each step attends to every step of the same node; optionally only to earlier steps."""

    def __init__(self, cfg: GmanConfig, **kwargs):
        super().__init__(cfg, 2 * cfg.D, **kwargs)
        self.causal = cfg.temporal_causal_mask

    def call(self, x, ste, training: bool = False):
        h = ops.concatenate([x, ste], axis=-1)
        # [B,K,T,N,d] -> [B,K,N,T,d]: attention runs over time.
        q, k, v = (ops.swapaxes(_heads(fc(h, training=training), self.K), 2, 3) for fc in (self.query, self.key, self.value))
        out = ops.swapaxes(_attend(q, k, v, self.d, causal=self.causal), 2, 3)
        return self.out(_merge_heads(out), training=training)


class TransformAttention(_QKV):
    """Future steps (queries from their STE) attend to history steps (keys from their STE, values from the encoder)."""

    def __init__(self, cfg: GmanConfig, **kwargs):
        super().__init__(cfg, cfg.D, **kwargs)

    def call(self, x, ste_history, ste_future, training: bool = False):
        q = ops.swapaxes(_heads(self.query(ste_future, training=training), self.K), 2, 3)
        k = ops.swapaxes(_heads(self.key(ste_history, training=training), self.K), 2, 3)
        v = ops.swapaxes(_heads(self.value(x, training=training), self.K), 2, 3)
        out = ops.swapaxes(_attend(q, k, v, self.d), 2, 3)
        return self.out(_merge_heads(out), training=training)


class GatedFusion(keras.layers.Layer):
    """z = sigmoid(FC_nobias(HS) + FC(HT)); H = z*HS + (1-z)*HT -> FC[D relu, D]."""

    def __init__(self, cfg: GmanConfig, **kwargs):
        super().__init__(**kwargs)
        self.from_spatial = FC((cfg.D,), (None,), cfg, use_bias=False, name="from_spatial")
        self.from_temporal = FC((cfg.D,), (None,), cfg, name="from_temporal")
        self.out = FC((cfg.D, cfg.D), ("relu", None), cfg, name="output")

    def build(self, input_shape) -> None:
        for fc in (self.from_spatial, self.from_temporal, self.out):
            fc.build(tuple(input_shape))

    def call(self, hs, ht, training: bool = False):
        z = ops.sigmoid(self.from_spatial(hs, training=training) + self.from_temporal(ht, training=training))
        return self.out(z * hs + (1 - z) * ht, training=training)


class STAttBlock(keras.layers.Layer):
    """Spatial and temporal attention fused by a gate, added to the input (residual)."""

    def __init__(self, cfg: GmanConfig, **kwargs):
        super().__init__(**kwargs)
        self.spatial = SpatialAttention(cfg, name="spatial")
        self.temporal = TemporalAttention(cfg, name="temporal")
        self.fusion = GatedFusion(cfg, name="fusion")

    def build(self, input_shape) -> None:
        for layer in (self.spatial, self.temporal, self.fusion):
            layer.build(input_shape)

    def call(self, x, ste, training: bool = False):
        hs = self.spatial(x, ste, training=training)
        ht = self.temporal(x, ste, training=training)
        return x + self.fusion(hs, ht, training=training)


class GMAN(keras.Model):
    """inputs (x [B,P,N] raw readings, te [B,P+Q,2] int day-of-week, time-of-day) -> [B,Q,N] raw predictions."""

    def __init__(self, cfg: GmanConfig, spatial_embedding: np.ndarray, mean: float, std: float, seed: int = 0, **kwargs):
        super().__init__(name=kwargs.pop("name", "gman"), **kwargs)
        se = np.asarray(spatial_embedding, dtype="float32")
        if se.ndim != 2 or se.shape[1] != cfg.se_dims:
            raise ValueError(f"spatial embedding has shape {se.shape}; expected [num_sensors, se_dims={cfg.se_dims}]")
        self.P, self.Q, self.steps_per_day = cfg.P, cfg.Q, cfg.steps_per_day
        self.num_sensors = se.shape[0]
        self.spatial_embedding = self.add_weight(
            shape=se.shape, initializer=keras.initializers.Constant(se), trainable=False, name="spatial_embedding"
        )
        self.mean = self.add_weight(shape=(), initializer=keras.initializers.Constant(mean), trainable=False, name="input_mean")
        self.std = self.add_weight(shape=(), initializer=keras.initializers.Constant(std), trainable=False, name="input_std")
        D = cfg.D
        self.input_fc = FC((D, D), ("relu", None), cfg, name="input")
        self.se_fc = FC((D, D), ("relu", None), cfg, name="se")
        self.te_fc = FC((D, D), ("relu", None), cfg, name="te")
        self.encoder = [STAttBlock(cfg, name=f"encoder_{i}") for i in range(cfg.L)]
        self.transform = TransformAttention(cfg, name="transform")
        self.decoder = [STAttBlock(cfg, name=f"decoder_{i}") for i in range(cfg.L)]
        self.output_fc = FC((D, 1), ("relu", None), cfg, dropout=cfg.output_dropout, seed=seed, name="output")

    def build(self, input_shape=None) -> None:
        """Every variable from the configuration alone (no forward pass)."""
        D = self.input_fc.steps[0][1].units
        self.input_fc.build(_features(1))
        self.se_fc.build(_features(self.spatial_embedding.shape[1]))
        self.te_fc.build(_features(DAYS_PER_WEEK + self.steps_per_day))
        for block in (*self.encoder, self.transform, *self.decoder):
            block.build(_features(D))
        self.output_fc.build(_features(D))

    def embed(self, te, training: bool = False):
        """STE [B,P+Q,N,D] = FC(SE) + FC(one-hot day-of-week || one-hot time-of-day)."""
        se = self.se_fc(self.spatial_embedding[None, None], training=training)
        te = ops.cast(te, "int32")
        onehot = ops.concatenate(
            [ops.one_hot(te[..., 0], DAYS_PER_WEEK), ops.one_hot(te[..., 1], self.steps_per_day)], axis=-1
        )
        return se + self.te_fc(onehot[:, :, None, :], training=training)

    def call(self, inputs, training: bool = False):
        x, te = inputs
        x = (ops.cast(x, "float32") - self.mean) / self.std
        h = self.input_fc(x[..., None], training=training)
        ste = self.embed(te, training=training)
        ste_history, ste_future = ste[:, : self.P], ste[:, self.P :]
        for block in self.encoder:
            h = block(h, ste_history, training=training)
        h = self.transform(h, ste_history, ste_future, training=training)
        for block in self.decoder:
            h = block(h, ste_future, training=training)
        out = ops.squeeze(self.output_fc(h, training=training), axis=-1)
        return out * self.std + self.mean


def build_model(cfg: GmanConfig, spatial_embedding: np.ndarray, mean: float, std: float, seed: int | None = None) -> GMAN:
    """A GMAN with every variable created."""
    model = GMAN(cfg, spatial_embedding, mean, std, seed=cfg.seed if seed is None else seed)
    model.build()
    return model


def count_trainable(model: keras.Model) -> int:
    """Trainable scalars, as the reference's train.py counts them (BN gamma/beta in, moving statistics out)."""
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def parameter_count(cfg: GmanConfig) -> int:
    """Trainable parameters of the model `cfg` builds; independent of the number of sensors."""
    model = build_model(cfg, np.zeros((2, cfg.se_dims), "float32"), 0.0, 1.0)
    return count_trainable(model)
