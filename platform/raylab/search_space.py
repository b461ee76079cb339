"""Search spaces for sweeps: a small grammar, checked against the model's config before Ray starts.

    lr=loguniform(1e-5,1e-2)                  float, log-uniform in [a, b] (0 < a < b)
    dropout=uniform(0,0.5)                    float, uniform in [a, b] (a < b)
    width=randint(4,16)                       integer in [a, b], both ends included
    per_worker_batch_size=choice(32,64,128)   one of the values, sampled per trial
    family=grid(residual,se)                  every value, `samples` times each (random search only)

The same strings are used on the command line (`--space 'lr=loguniform(1e-5,1e-2)'`)
and in an experiment file's `search:` section (`lr: loguniform(1e-5, 1e-2)`).
Values are YAML scalars (`1e-3`, `64`, `se`, `true`). Every value a dimension can
take -- both bounds, a point between them for floats, each choice -- is validated
with the model's config class on top of the stage's values, so a typo'd field, a
bad distribution or an impossible bound is one `ConfigError` sentence before any
trial starts.

`trial_config` is where a trial's sampled values become a typed config (at the
Ray boundary, `raylab.tune_backend`), with the learning-rate rule for batch-size
changes made explicit: `lr_scaling` none | linear | sqrt, relative to the
stage's global batch (per_worker_batch_size x grad_accum_steps).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from raylab.config import ConfigError, TrainConfig, validate_config

Kind = Literal["uniform", "loguniform", "randint", "choice", "grid"]
LrScaling = Literal["none", "linear", "sqrt"]
KINDS: tuple[str, ...] = ("uniform", "loguniform", "randint", "choice", "grid")
_FORMS = "uniform(a,b), loguniform(a,b), randint(a,b), choice(v1,v2,...) or grid(v1,v2,...)"
_DISTRIBUTION = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)
# Fields that name where things are rather than how to train: searching them makes no sense.
_NOT_SEARCHABLE = ("init_from",)
# Fields whose change alters the global batch, which lr_scaling relates the lr to.
BATCH_FIELDS = ("per_worker_batch_size", "grad_accum_steps")


@dataclass(frozen=True)
class Dimension:
    """One searched field: its distribution and that distribution's arguments."""

    field: str
    kind: Kind
    args: tuple[Any, ...]  # (low, high) for uniform/loguniform/randint; the values for choice/grid

    def text(self) -> str:
        return f"{self.field}={self.kind}({', '.join(_show(a) for a in self.args)})"

    def candidates(self) -> list[Any]:
        """The values checked against the config: bounds, a fractional point for floats, each option."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        # An inner point that is not a whole number, so an integer field refuses a float distribution.
        inner = low ** 0.63 * high ** 0.37 if self.kind == "loguniform" else low + 0.37 * (high - low)
        if float(inner).is_integer():
            inner += 1e-3 * (high - low)
        return [float(low), float(high), inner]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _scalar(raw: str, where: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw.strip()
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        for number in (int, float):
            try:
                value = number(value)
                break
            except ValueError:
                pass
    if value is None or isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: '{raw.strip()}' is not a single value (a number, word or true/false).")
    return value


def _number(value: Any, where: str, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{where}: {value!r} is not {'an integer' if integer else 'a number'}.")
    return value


def parse_distribution(field: str, text: str, where: str) -> Dimension:
    """`loguniform(1e-5,1e-2)` for `field` as a Dimension; `where` names the source in errors."""
    match = _DISTRIBUTION.match(str(text))
    if not match:
        raise ConfigError(f"{where}: '{text}' is not a distribution; write one of {_FORMS}.")
    kind, inner = match.group(1), match.group(2)
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{where}: unknown distribution '{kind}'{hint}; use one of {_FORMS}.")
    args = tuple(_scalar(part, where) for part in inner.split(",")) if inner.strip() else ()
    if kind in ("choice", "grid"):
        if not args:
            raise ConfigError(f"{where}: {kind}() needs at least one value.")
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}: {kind}() lists a value twice.")
        return Dimension(field, kind, args)
    if len(args) != 2:
        raise ConfigError(f"{where}: {kind}() takes two bounds (low, high), got {len(args)}.")
    low, high = (_number(a, where, integer=kind == "randint") for a in args)
    if not low < high:
        raise ConfigError(f"{where}: {kind}() needs low < high, got {_show(low)} and {_show(high)}.")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform() needs bounds above 0, got {_show(low)}.")
    return Dimension(field, kind, (low, high))


def parse_space_option(text: str) -> Dimension:
    """One `--space field=distribution(...)` string."""
    field, sep, rest = text.partition("=")
    where = f"--space '{text}'"
    if not sep or not field.strip() or not re.fullmatch(r"[A-Za-z_]\w*", field.strip()):
        raise ConfigError(f"{where} is not of the form field=distribution(...), e.g. 'lr=loguniform(1e-5,1e-2)'.")
    return parse_distribution(field.strip(), rest, where)


def parse_space_mapping(space: Any, where: str) -> list[Dimension]:
    """A YAML `space:` mapping (field: distribution string)."""
    if not isinstance(space, dict):
        raise ConfigError(f"{where} must be a mapping of field: distribution, e.g. lr: loguniform(1e-5, 1e-2).")
    return [parse_distribution(str(field), text, f"{where}.{field}") for field, text in space.items()]


def check_space(config_cls: type[TrainConfig], base: dict[str, Any], dims: list[Dimension], source: dict[str, str]) -> None:
    """Every value each dimension can take must make a valid config on top of `base`.

    `source` maps a field to how the user wrote it (`--space '...'` or a YAML key) for the message.
    """
    seen: set[str] = set()
    for dim in dims:
        where = source.get(dim.field, dim.field)
        if dim.field in seen:
            raise ConfigError(f"{where}: field '{dim.field}' is searched twice.")
        seen.add(dim.field)
        if dim.field not in config_cls.model_fields:
            close = difflib.get_close_matches(dim.field, list(config_cls.model_fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{where}: '{dim.field}' is not a field of {config_cls.__name__}{hint}.")
        if dim.field in _NOT_SEARCHABLE:
            raise ConfigError(f"{where}: '{dim.field}' cannot be searched.")
        for value in dim.candidates():
            validate_config(config_cls, {**base, dim.field: value}, where)


def global_batch(values: dict[str, Any]) -> int:
    return int(values["per_worker_batch_size"]) * int(values["grad_accum_steps"])


def scaled_lr(lr: float, trial_batch: int, stage_batch: int, rule: LrScaling) -> float:
    """`lr` (meant for the stage's batch) for a trial's batch under `rule`."""
    ratio = trial_batch / stage_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    return lr


def trial_config(base: TrainConfig, params: dict[str, Any], rule: LrScaling) -> TrainConfig:
    """The typed config of one trial: the stage's config with the sampled values, re-validated.

    A sampled (or the stage's) lr is the lr at the stage's batch size; with lr_scaling
    linear or sqrt it follows the trial's global batch.
    """
    updated = base.model_copy(update=params)
    values = updated.model_dump()
    values["lr"] = scaled_lr(values["lr"], global_batch(values), global_batch(base.model_dump()), rule)
    # Checked before Ray started; re-validated here because model_copy does not validate.
    return validate_config(type(base), values, f"trial values {params}")
