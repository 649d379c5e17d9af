"""Training configuration: a dataclass of plain fields per section, loaded from YAML with command-line overrides.

A recipe in `configs/*.yaml` has up to five sections (`data`, `model`, `scheduler`, `optimizer`,
`training`), each a mapping of the fields below. Overrides use dotted keys, `optimizer.lr=1e-4`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION_MODES = ("no", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class DataConfig:
    """Location of the token shards and options of their reader."""

    shards: str = ""  # folder with `{split}-*.tar` token shards and their meta.json
    shuffle_buffer: int = 10000  # samples held in the shuffle buffer of each data worker
    num_workers: int = 2  # DataLoader worker processes per training process (0 reads in the main process)
    strict: bool = False  # stop at a damaged token shard instead of skipping it


@dataclass
class ModelConfig:
    """The transformer: a named size preset plus the data-dependent sizes (None takes them from meta.json)."""

    preset: str = "tiny"  # XDLMTransformer preset (tiny, small, base) or the path of a preset YAML file
    num_embeddings: int | None = None  # codebook size N; must match meta.json when set
    grid_size: int | None = None  # tokens per side; must match meta.json when set
    num_classes: int | None = None  # must match meta.json when set
    class_dropout_prob: float = 0.1  # probability of replacing the label by "no class" in training
    time_conditioning: bool = False


@dataclass
class SchedulerConfig:
    """The XDLM noise: mixing ratio k (0 = MDLM, 1 = UDLM), schedule of alpha_t and the range of training times."""

    mixing_ratio: float = 0.1
    noise_schedule: str = "log-linear"
    eps: float = 1e-3
    antithetic: bool = True  # stratify the training times across the global batch


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up, then a constant or cosine learning rate, and gradient-norm clipping."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    lr_schedule: str = "constant"  # "constant" or "cosine" (down to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # maximum global gradient norm; 0 disables clipping


@dataclass
class TrainingConfig:
    """Budget, batch layout, EMA, logging, checkpoints and export of one run."""

    output_dir: str = "runs/xdlm"
    max_steps: int = 10000  # optimizer steps
    global_batch_size: int = 256  # samples per optimizer step over all processes and accumulation steps
    micro_batch_size: int = 64  # samples per forward pass in one process
    seed: int = 0
    mixed_precision: str = "no"  # "no" or "bf16" (autocast of the transformer's forward pass)
    num_threads: int | None = None  # torch CPU threads per process; None keeps torch's default
    ema_decay: float = 0.9999  # target decay; early steps use min(ema_decay, (1 + step) / (10 + step))
    log_every: int = 50  # steps between log lines and CSV rows
    checkpoint_every: int = 1000  # steps between checkpoints; one is also written at the end
    keep_checkpoints: int = 3  # most recent complete checkpoints kept on disk
    sample_every: int = 0  # steps between sample grids (PNG); 0 writes none
    sample_classes: int = 10  # classes shown in a sample grid (the first ones)
    samples_per_class: int = 4
    sample_steps: int = 8  # sampler steps for the grids
    tokenizer: str | None = None  # tokenizer folder for grids and export; None takes meta.json's "tokenizer"
    export_dir: str | None = None  # pipeline folder written at the end; None is `{output_dir}/pipeline`


@dataclass
class TrainConfig:
    """The whole recipe of a training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError on values that no run can use."""
        training, optimizer = self.training, self.optimizer
        positive = {
            "training.max_steps": training.max_steps,
            "training.global_batch_size": training.global_batch_size,
            "training.micro_batch_size": training.micro_batch_size,
            "training.log_every": training.log_every,
            "training.checkpoint_every": training.checkpoint_every,
            "training.keep_checkpoints": training.keep_checkpoints,
            "training.sample_steps": training.sample_steps,
            "data.shuffle_buffer": self.data.shuffle_buffer,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be at least 1, got {value}")

        non_negative = {
            "training.sample_every": training.sample_every,
            "data.num_workers": self.data.num_workers,
            "optimizer.warmup_steps": optimizer.warmup_steps,
            "optimizer.grad_clip": optimizer.grad_clip,
            "optimizer.weight_decay": optimizer.weight_decay,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")

        if training.num_threads is not None and training.num_threads < 1:
            raise ValueError(f"training.num_threads must be at least 1 or null, got {training.num_threads}")
        if not optimizer.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {optimizer.lr}")
        if len(optimizer.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in optimizer.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {optimizer.betas}")
        if optimizer.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"optimizer.lr_schedule must be one of {LR_SCHEDULES}, got {optimizer.lr_schedule!r}")
        if not 0.0 <= optimizer.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {optimizer.min_lr_ratio}")

        if training.mixed_precision not in MIXED_PRECISION_MODES:
            raise ValueError(
                f"training.mixed_precision must be one of {MIXED_PRECISION_MODES}, got {training.mixed_precision!r}"
            )
        if not 0.0 <= training.ema_decay < 1.0:
            raise ValueError(f"training.ema_decay must be in [0, 1), got {training.ema_decay}")
        if not 0.0 <= self.model.class_dropout_prob < 1.0:
            raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {self.model.class_dropout_prob}")
        if not self.data.shards:
            raise ValueError("data.shards is not set; pass data.shards=FOLDER (a folder of token shards with meta.json)")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError naming the key."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)

    # `X | None`: None (or the text "null"/"none") stays None, anything else converts to X.
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        (inner,) = [argument for argument in arguments if argument is not type(None)]
        return _coerce(value, inner, key)

    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, for example {key}=[0.9,0.999]; got {value!r}")
        return [_coerce(item, arguments[0], f"{key}[{index}]") for index, item in enumerate(value)]

    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{key} must be true or false, got {value!r}")

    if annotation is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer, got {value!r}") from None

    if annotation is float:
        # PyYAML reads `3e-4` (no decimal point) as text, so floats are parsed here.
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {value!r}") from None

    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key} must be text, got {value!r}")
        return str(value)

    raise TypeError(f"no conversion for {key} of type {annotation!r}")


def _set_field(config: TrainConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    sections = {item.name: item for item in dataclasses.fields(config)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ValueError(f"unknown config key {key!r}; keys are SECTION.FIELD with SECTION one of {sorted(sections)}")
    section_name, field_name = parts
    section = getattr(config, section_name)
    field_types = _section_types(type(section))
    if field_name not in field_types:
        raise ValueError(f"unknown config key {key!r}; fields of {section_name!r} are {sorted(field_types)}")
    setattr(section, field_name, _coerce(value, field_types[field_name], key))


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested mappings `{section: {field: value}}`; unknown keys raise ValueError."""
    config = TrainConfig()
    if not isinstance(values, dict):
        raise ValueError(f"a training config must be a mapping of sections, got {type(values).__name__}")
    for section_name, section_values in values.items():
        if not isinstance(section_values, dict):
            raise ValueError(f"config section {section_name!r} must be a mapping of fields, got {section_values!r}")
        for field_name, value in section_values.items():
            _set_field(config, f"{section_name}.{field_name}", value)
    return config


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `SECTION.FIELD=VALUE` overrides in order, in place, and return the config."""
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"invalid override {override!r}; write SECTION.FIELD=VALUE, for example optimizer.lr=1e-4")
        _set_field(config, key.strip(), value.strip())
    return config


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), validate: bool = True
) -> TrainConfig:
    """Load a YAML recipe (or start from the defaults when `path` is None), apply overrides and validate."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} not found; pass a YAML recipe such as configs/fashion-mnist-xdlm.yaml")
        with open(path, encoding="utf-8") as file:
            values = yaml.safe_load(file) or {}
        try:
            config = config_from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    apply_overrides(config, list(overrides))
    if validate:
        config.validate()
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML (the format `load_config` reads), atomically."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        yaml.safe_dump(config.to_dict(), file, sort_keys=False)
    os.replace(temporary, path)
