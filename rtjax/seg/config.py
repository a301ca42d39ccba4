"""Configuration of segmentation training and inference (YAML <-> frozen dataclasses).

A config (see `configs/seg_cpu.yaml`) has the sections `model` (`UNetConfig`), `render`
(`RenderConfig`: patch, working spacing, synthetic contrasts), `bank` (`BankConfig`: the FK
tumour bank, with a `growth.inverse.GeneratorConfig`), `train` (`TrainConfig`), `data`
(`DataConfig`: the real cases) and `infer` (`InferConfig`), plus a `version` string.
Unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from growth.inverse import GeneratorConfig
from rtjax.config import from_dict, to_dict
from rtjax.config import load_config as _load_config
from rtjax.seg.model import UNetConfig
from rtjax.seg.synth import RenderConfig

__all__ = [
    "BankConfig",
    "TrainConfig",
    "DataConfig",
    "InferConfig",
    "SegConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


@dataclass(frozen=True)
class BankConfig:
    """The bank of simulated tumours.

    Attributes:
        cases: tumours to simulate (fewer if `train.stage_fractions` runs out of time).
        sim_batch: simulations per vmapped generator batch.
        seed: seed of the simulation stream.
        generator: `growth.inverse.GeneratorConfig` (box, crop grid, parameter ranges).
    """

    cases: int = 64
    sim_batch: int = 16
    seed: int = 0
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule (three stages: base on synthetic data, leave-one-out fine-tunes,
    final fine-tune on every real case).

    Attributes:
        members: ensemble size (members trained side by side, each on its own batches).
        seed: initialisation and sampling seed.
        batch_size: patches per member and step.
        base_steps: steps of the base model (synthetic patches, plus `base_real_fraction`).
        finetune_steps: steps of each leave-one-out fine-tune.
        final_steps: steps of the final fine-tune on all real cases.
        learning_rate: peak learning rate of the base stage (AdamW, warm-up + cosine).
        finetune_learning_rate: peak learning rate of the fine-tunes (cosine).
        warmup_steps: warm-up of the base stage.
        weight_decay: AdamW weight decay.
        base_real_fraction: probability that a base-stage patch is real (0: synthetic
            only, so that leave-one-out scores are never trained on).
        real_fraction: probability that a fine-tune patch is real.
        foreground_fraction: real patches centred on a tumour voxel (else any brain voxel).
        dice_weight: weight of the soft Dice term beside the binary cross-entropy.
        checkpoint_every: save an orbax checkpoint every so many steps.
        keep_checkpoints: checkpoints kept per stage.
        log_every: print the loss every so many steps.
        max_seconds: wall-clock budget of a whole run (None: no limit); split over the
            stages by `stage_fractions` (bank, base, leave-one-out, final); a stage that
            runs out checkpoints and the run moves on (a rerun resumes it).
        stage_fractions: shares of `max_seconds` of the four stages.
    """

    members: int = 1
    seed: int = 0
    batch_size: int = 2
    base_steps: int = 300
    finetune_steps: int = 60
    final_steps: int = 100
    learning_rate: float = 2e-3
    finetune_learning_rate: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 1e-5
    base_real_fraction: float = 0.0
    real_fraction: float = 0.5
    foreground_fraction: float = 0.7
    dice_weight: float = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 20
    max_seconds: float | None = None
    stage_fractions: tuple[float, float, float, float] = (0.1, 0.5, 0.3, 0.1)

    def __post_init__(self):
        fr = tuple(float(f) for f in self.stage_fractions)
        if len(fr) != 4 or min(fr) < 0 or sum(fr) > 1.0 + 1e-6:
            raise ValueError("stage_fractions: four non-negative shares summing to <= 1")
        object.__setattr__(self, "stage_fractions", fr)


@dataclass(frozen=True)
class DataConfig:
    """The real cases (fine-tuning and leave-one-out validation).

    Attributes:
        root: data folder with `brats2015/` and `tcga/` (same layout as the project's
            shared data); None: `rtjax.data.data_root()` (`RTJAX_DATA` or ../shared/data);
            "none": synthetic only.
        sources: which sources to use (`rtjax.seg.data.SOURCES`).
        max_cases: use at most this many real cases (None: all found).
    """

    root: str | None = None
    sources: tuple[str, ...] = ("brats2015", "tcga")
    max_cases: int | None = None


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window inference at the working resolution (`render.spacing`).

    Attributes:
        patch: window side, working voxels (a multiple of the U-Net's divisor).
        overlap: fraction of the window shared with its neighbour (0 <= overlap < 1).
        batch: windows per network call (bounds the memory).
        weighting: "gaussian" or "linear" blending of overlapping windows.
        tta_axes: flip axes of test-time augmentation used with --uncertainty
            (each axis adds one flipped pass); [] for none.
        keep_fraction: post-processing: whole-tumour components smaller than this
            fraction of the largest are dropped (`keep_main_components`); 0 keeps all.
    """

    patch: int = 64
    overlap: float = 0.25
    batch: int = 1
    weighting: str = "gaussian"
    tta_axes: tuple[int, ...] = (0, 1, 2)
    keep_fraction: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "tta_axes", tuple(int(a) for a in self.tta_axes))
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError("infer.overlap must be in [0, 1)")
        if self.weighting not in ("gaussian", "linear"):
            raise ValueError("infer.weighting must be 'gaussian' or 'linear'")


@dataclass(frozen=True)
class SegConfig:
    """The whole configuration of a segmentation run."""

    version: str = "dev"
    model: UNetConfig = field(default_factory=UNetConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def __post_init__(self):
        object.__setattr__(self, "version", str(self.version))
        d = self.model.divisor
        if self.render.patch % d or self.infer.patch % d:
            raise ValueError(f"render.patch and infer.patch must be multiples of {d}")


def config_from_dict(data: dict | None, where: str = "config") -> SegConfig:
    """Build a `SegConfig` from a mapping of overrides; unknown keys are errors."""
    return from_dict(SegConfig, data, where)


def config_to_dict(config: SegConfig) -> dict:
    """Plain (YAML-able) mapping of a config: tuples as lists, contrast tables as mappings."""
    return to_dict(config)


def load_config(path: str | Path) -> SegConfig:
    """Read a YAML segmentation config (overrides of the defaults); errors name the file."""
    return _load_config(path, SegConfig)
