"""Configuration of the inverse model: generator, network and training (YAML <-> dataclasses).

A config file (see `configs/inverse_cpu.yaml`) holds only what differs from the defaults:
`generator` (`growth.inverse.GeneratorConfig`), `net` (`rtjax.inverse.network.NetConfig`;
its `net_shape` is always the generator's), `train` (`TrainConfig`) and a `version`
string. Read with `rtjax.config` (strict: unknown keys are errors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from growth.inverse import GeneratorConfig
from rtjax.config import ConfigError, from_dict, read_yaml
from rtjax.inverse.network import NetConfig

__all__ = ["TrainConfig", "InverseConfig", "config_from_dict", "load_config", "with_budget"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    Attributes:
        members: ensemble size (networks trained side by side, `nnx.vmap`).
        seed: seed of the training data stream and of the initialisation.
        train_cases: simulations in the training set.
        val_cases: held-out simulations (parameter errors).
        val_resim_cases: of those, how many are re-simulated for the density Dice.
        shard_size: simulations per npz shard.
        sim_batch: simulations per vmapped generator batch.
        batch_size: training batch per member.
        steps: optimisation steps.
        learning_rate: peak learning rate (AdamW, linear warm-up then cosine decay).
        warmup_steps: warm-up length.
        weight_decay: AdamW weight decay.
        checkpoint_every: save an orbax checkpoint every so many steps.
        keep_checkpoints: how many checkpoints to keep.
        log_every: print the loss every so many steps.
        redraw_thresholds: draw new u_T1/u_FL per sample and step (LearnMorph-Infer style)
            rather than using the generation-time thresholds.
        flip_lr: random left-right flips of the crop (axis 0).
        max_seconds: wall-clock budget of one `train_and_evaluate` call, seconds, data
            generation included (None: no budget, train for `steps`). The training set
            is generated until `data_fraction` of it is spent (at least one shard);
            training stops `reserve_seconds` before its end, checkpoints, then evaluates
            and exports; the learning rate then decays (cosine) over the time left.
        data_fraction: the part of `max_seconds` that data generation may use.
        reserve_seconds: the part of `max_seconds` kept for evaluation and export.
    """

    members: int = 2
    seed: int = 0
    train_cases: int = 2000
    val_cases: int = 40
    val_resim_cases: int = 30
    shard_size: int = 500
    sim_batch: int = 32
    batch_size: int = 32
    steps: int = 1000
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 50
    redraw_thresholds: bool = True
    flip_lr: bool = True
    max_seconds: float | None = None
    data_fraction: float = 0.35
    reserve_seconds: float = 30.0

    def __post_init__(self):
        if self.max_seconds is not None and self.max_seconds <= self.reserve_seconds:
            raise ValueError(f"max_seconds ({self.max_seconds}) must exceed reserve_seconds "
                             f"({self.reserve_seconds})")
        if not 0.0 < self.data_fraction < 1.0:
            raise ValueError(f"data_fraction must lie in (0, 1), got {self.data_fraction}")


@dataclass(frozen=True)
class InverseConfig:
    """The whole configuration of an inverse-model run."""

    version: str = "dev"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        object.__setattr__(self, "version", str(self.version))


def config_from_dict(data: dict | None, where: str = "config") -> InverseConfig:
    """Build an `InverseConfig` from a mapping of overrides; unknown keys are errors.
    `net.net_shape` follows `generator.net_shape` (an explicit different value is an error)."""
    data = dict(data or {})
    gen_shape = (data.get("generator") or {}).get("net_shape", GeneratorConfig().net_shape)
    net = dict(data.get("net") or {})
    if "net_shape" in net and int(net["net_shape"]) != int(gen_shape):
        raise ConfigError(f"{where}: net.net_shape must equal generator.net_shape (or be left out)")
    data["net"] = {**net, "net_shape": int(gen_shape)}
    return from_dict(InverseConfig, data, where)


def load_config(path: str | Path) -> InverseConfig:
    """Read a YAML inverse-model config (overrides of the defaults); errors name the file."""
    try:
        return config_from_dict(read_yaml(path))
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def with_budget(config: InverseConfig, max_seconds: float | None) -> InverseConfig:
    """`config` with `train.max_seconds` replaced."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, max_seconds=max_seconds))
