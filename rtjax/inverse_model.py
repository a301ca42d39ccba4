"""Training, shipping and use of the learned inverse model (`growth.inverse`).

* `load_config(path)` reads a YAML config (see `configs/inverse_cpu.yaml`): `generator`
  (`growth.inverse.GeneratorConfig`), `net` (`growth.inverse.NetConfig`), `train`
  (`TrainConfig`) and a `version` string.
* `train_and_evaluate(config, workdir)`: generates (or reuses) the simulated datasets as
  npz shards under `workdir/data`, trains an ensemble with optax (AdamW, warm-up + cosine),
  saves orbax checkpoints every `checkpoint_every` steps and resumes from the latest one,
  evaluates on held-out simulations (another seed: never seen in training) and writes
  `workdir/weights/` in the shipped layout (`params/` orbax checkpoint of the model only,
  `config.yaml`, `metrics.json`). With `train.max_seconds` it keeps to a wall-clock
  budget (data generation, training, evaluation and export together).
* `device_job(config, budget_s, out_dir)`: the one time-budgeted accelerator job
  (`scripts/device_inverse.py`): training, data-generation throughput, fit timing.
* `load_weights(path=None)`: the shipped weights (`rtjax/weights/inverse`) or another
  weights folder, restored into an `nnx.eval_shape` target.
* `predict(core, edema, wm, gm, spacing)`: the estimate for one case on its own grid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from growth.inverse import GeneratorConfig, NetConfig, TARGET_NAMES

__all__ = [
    "DEFAULT_WEIGHTS",
    "TrainConfig",
    "InverseConfig",
    "InverseWeights",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "load_atlas",
    "write_dataset",
    "load_dataset",
    "learning_rate_factor",
    "make_optimizer",
    "train_and_evaluate",
    "evaluate",
    "export_weights",
    "load_weights",
    "predict",
    "generation_throughput",
    "device_job",
    "check_config_keys",
    "checkpoint_manager",
    "to_single_device",
    "write_yaml",
]

#: The weights shipped inside the package.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "inverse"

_VAL_SEED_OFFSET = 1_000_003  # validation stream: a seed the training stream never uses


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


def check_config_keys(cls, data: dict, where: str) -> None:
    """Raise ValueError naming `where` when `data` has keys that dataclass `cls` lacks."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")


def config_from_dict(data: dict) -> InverseConfig:
    """Build an `InverseConfig` from a mapping; unknown keys are errors."""
    data = dict(data or {})
    check_config_keys(InverseConfig, data, "config")
    gen_data = dict(data.get("generator") or {})
    gen = GeneratorConfig.from_dict(gen_data)
    net_data = dict(data.get("net") or {})
    if "net_shape" in net_data and int(net_data["net_shape"]) != gen.net_shape:
        raise ValueError("net.net_shape must equal generator.net_shape (or be left out)")
    net_data["net_shape"] = gen.net_shape
    net = NetConfig.from_dict(net_data)
    train_data = dict(data.get("train") or {})
    check_config_keys(TrainConfig, train_data, "config.train")
    return InverseConfig(
        version=str(data.get("version", "dev")), generator=gen, net=net,
        train=TrainConfig(**train_data),
    )


def load_config(path: str | Path) -> InverseConfig:
    """Read a YAML inverse-model config."""
    import yaml

    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    try:
        return config_from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def config_to_dict(config: InverseConfig) -> dict:
    """Plain (YAML-able) mapping of a config: tuples as lists."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def write_yaml(path: Path, data: dict) -> None:
    """Write `data` as YAML (key order kept), creating the parent folder."""
    import yaml

    from rtjax.provenance import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- data


def load_atlas(name: str = "mni152") -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """WM and GM probability arrays (RAS canonical) and spacing (mm) of a built-in atlas."""
    from rtjax.atlas import atlas_tissue_paths
    from rtjax.io import load_image

    paths = atlas_tissue_paths(name)
    wm = load_image(paths["wm"], kind="probability")
    gm = load_image(paths["gm"], kind="probability")
    return wm.data, gm.data, tuple(float(s) for s in wm.spacing)


#: Fields stored per case in a dataset shard, and their on-disk dtypes.
_SHARD_FIELDS = {
    "density": np.float16, "wm": np.uint8, "gm": np.uint8,
    "origin_rel_mm": np.float32, "com_box_mm": np.float32,
    "origin_atlas_mm": np.float32, "transform": np.float32,
    "dw": np.float32, "rho": np.float32, "t_days": np.float32,
    "sqrt_dw_t": np.float32, "sqrt_rho_t": np.float32, "u_t1": np.float32, "u_fl": np.float32,
}


def _encode_case_arrays(batch: dict) -> dict:
    out = {}
    for key, dtype in _SHARD_FIELDS.items():
        value = np.asarray(batch[key])
        if dtype == np.uint8:
            value = np.round(np.clip(value, 0.0, 1.0) * 255.0)
        out[key] = value.astype(dtype)
    return out


def write_dataset(
    gen: GeneratorConfig,
    out_dir: str | Path,
    n_cases: int,
    *,
    seed: int,
    atlas=None,
    shard_size: int = 500,
    sim_batch: int = 32,
    progress: bool = True,
    deadline: float | None = None,
) -> Path:
    """Simulate `n_cases` accepted cases into npz shards `out_dir/shard_XXXXX.npz`.

    Shard k is generated from its own stream (seed, k), so an interrupted run resumes at
    the first missing shard; shards are written atomically. `dataset.json` records the
    generator config, the counts (`n_cases` asked for, `cases` on disk) and the generation
    time. Tissue is stored as uint8 (1/255), density as float16. With a `deadline` (a
    `time.perf_counter()` value) no new shard is started after it, once one exists: the
    dataset is then partial and a later call completes it.
    """
    from growth.inverse import iterate_simulations
    from rtjax.provenance import run_metadata, write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "dataset.json"
    gen_dict = config_to_dict(InverseConfig(generator=gen))["generator"]
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("generator") != gen_dict or meta.get("seed") != seed:
            raise ValueError(f"{out_dir} holds a dataset from another generator config or seed")
    atlas_wm, atlas_gm, atlas_spacing = atlas if atlas is not None else load_atlas()
    n_shards = math.ceil(n_cases / shard_size)
    start = time.perf_counter()
    generated = 0
    for k in range(n_shards):
        path = out_dir / f"shard_{k:05d}.npz"
        want = min(shard_size, n_cases - k * shard_size)
        if path.exists():
            continue
        if deadline is not None and time.perf_counter() >= deadline and k > 0:
            break
        stream = iterate_simulations(gen, atlas_wm, atlas_gm, atlas_spacing,
                                     seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]), batch_size=sim_batch)
        parts, have = [], 0
        while have < want:
            batch = next(stream)
            parts.append(_encode_case_arrays(batch))
            have += len(batch["dw"])
        shard = {key: np.concatenate([p[key] for p in parts])[:want] for key in _SHARD_FIELDS}
        tmp = out_dir / f".shard_{k:05d}.tmp.npz"
        np.savez(tmp, **shard)
        os.replace(tmp, path)
        generated += want
        if progress:
            done = min((k + 1) * shard_size, n_cases)
            print(f"[data] {out_dir.name}: {done}/{n_cases} cases "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    on_disk = sum(min(shard_size, n_cases - k * shard_size) for k in range(n_shards)
                  if (out_dir / f"shard_{k:05d}.npz").exists())
    write_json_atomic(meta_path, {"generator": gen_dict, "seed": seed, "n_cases": n_cases,
                                  "cases": on_disk, "shard_size": shard_size,
                                  "generated_this_run": generated,
                                  "seconds_this_run": time.perf_counter() - start,
                                  **run_metadata()})
    return out_dir


def load_dataset(path: str | Path, n_cases: int | None = None) -> dict[str, np.ndarray]:
    """Concatenate a dataset's shards (on-disk dtypes kept), first `n_cases` cases."""
    paths = sorted(Path(path).glob("shard_*.npz"))
    if not paths:
        raise FileNotFoundError(f"no dataset shards in {path}")
    parts = []
    for p in paths:
        with np.load(p) as data:
            parts.append({k: data[k] for k in _SHARD_FIELDS})
    data = {k: np.concatenate([p[k] for p in parts]) for k in _SHARD_FIELDS}
    if n_cases is not None:
        data = {k: v[:n_cases] for k, v in data.items()}
    return data


# --------------------------------------------------------------------------- training


def _target_stats(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Normalisation of the targets: mean and scale per output, from the training set."""
    a = data["sqrt_dw_t"].astype(np.float64)
    b = data["sqrt_rho_t"].astype(np.float64)
    off = np.abs(data["origin_rel_mm"]).astype(np.float64)
    off_scale = max(float(np.sqrt((off**2).mean())), 1.0)
    mean = np.array([0.0, 0.0, 0.0, a.mean(), b.mean(), 0.675, 0.275])
    scale = np.array([off_scale] * 3 + [a.std() + 1e-3, b.std() + 1e-3, 0.1, 0.13])
    return mean.astype(np.float32), scale.astype(np.float32)


def _make_batch_fn(config: InverseConfig):
    """jit-able (arrays, key) -> (inputs (K, B, n, n, n, 4), normalised targets (K, B, 7)).

    Per member and sample: thresholds redrawn (if configured), random LR flip, inputs from
    thresholding the stored density, target origin relative to the visible centre of mass.
    """
    import jax
    import jax.numpy as jnp

    from growth.inverse import threshold_inputs

    gen, tr = config.generator, config.train
    members = tr.members

    def one(key, density, wm, gm, origin_rel, a, b, u_t1, u_fl):
        k1, k2, k3 = jax.random.split(key, 3)
        if tr.redraw_thresholds:
            u_t1 = jax.random.uniform(k1, (), minval=gen.ranges.u_t1[0], maxval=gen.ranges.u_t1[1])
            u_fl = jax.random.uniform(k2, (), minval=gen.ranges.u_fl[0], maxval=gen.ranges.u_fl[1])
        if tr.flip_lr:
            flip = jax.random.bernoulli(k3)
            density, wm, gm = (jnp.where(flip, v[::-1], v) for v in (density, wm, gm))
            origin_rel = origin_rel * jnp.where(flip, jnp.array([-1.0, 1.0, 1.0]), 1.0)
        x, com = threshold_inputs(density, wm, gm, u_t1, u_fl, gen.net_spacing)
        y = jnp.concatenate([origin_rel - com, jnp.stack([a, b, u_t1, u_fl])])
        return x, y

    def make(batch, key, mean, scale):
        density = batch["density"].astype(jnp.float32)
        wm = batch["wm"].astype(jnp.float32) / 255.0
        gm = batch["gm"].astype(jnp.float32) / 255.0
        bsz = density.shape[0]
        keys = jax.random.split(key, (members, bsz))
        per_sample = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0))
        per_member = jax.vmap(per_sample, in_axes=(0,) + (None,) * 8)
        x, y = per_member(keys, density, wm, gm, batch["origin_rel_mm"], batch["sqrt_dw_t"],
                          batch["sqrt_rho_t"], batch["u_t1"], batch["u_fl"])
        return x, (y - mean) / scale

    return make


_BATCH_KEYS = ("density", "wm", "gm", "origin_rel_mm", "sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")


def checkpoint_manager(directory: Path, tr: TrainConfig):
    """An orbax CheckpointManager in `directory` keeping the config's last checkpoints."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=tr.keep_checkpoints, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def to_single_device(tree):
    """Abstract arrays placed on the default device (a checkpoint written on a GPU then
    restores on a CPU-only machine)."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def learning_rate_factor(step: int, progress: float, warmup_steps: int, end_factor: float = 0.02) -> float:
    """Multiplier of the peak learning rate: linear warm-up from 0 over `warmup_steps`
    steps, then a cosine from 1 down to `end_factor` over `progress` in [0, 1] (the
    fraction of the step count, or of the time budget, spent after the warm-up)."""
    if step < warmup_steps:
        return step / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * p))


def _scale_by_factor():
    """An optax transformation that multiplies the updates by the `lr_factor` extra
    argument (the schedule is computed on the host: by step, or by the time budget)."""
    import jax
    import optax

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, lr_factor=1.0, **extra):
        del params, extra
        return jax.tree.map(lambda u: u * lr_factor, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(tr: TrainConfig):
    """Gradient clipping, AdamW at the peak rate, then the host-side schedule factor."""
    import optax

    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(tr.learning_rate, weight_decay=tr.weight_decay),
        _scale_by_factor(),
    )


@dataclass(frozen=True)
class _Clock:
    """The time budget of one `train_and_evaluate` call (`time.perf_counter()` values;
    None everywhere without a budget)."""

    start: float
    data_deadline: float | None
    train_deadline: float | None

    @classmethod
    def create(cls, tr: TrainConfig) -> "_Clock":
        t0 = time.perf_counter()
        if tr.max_seconds is None:
            return cls(t0, None, None)
        return cls(t0, t0 + tr.data_fraction * tr.max_seconds,
                   t0 + tr.max_seconds - tr.reserve_seconds)

    def out_of_time(self) -> bool:
        return self.train_deadline is not None and time.perf_counter() >= self.train_deadline

    def progress(self, train_start: float) -> float:
        """Fraction of the training time budget spent (0 without a budget)."""
        if self.train_deadline is None:
            return 0.0
        return (time.perf_counter() - train_start) / max(self.train_deadline - train_start, 1e-9)


def train_and_evaluate(
    config: InverseConfig | str | Path,
    workdir: str | Path,
    *,
    stop_after: int | None = None,
    evaluate_at_end: bool = True,
    atlas=None,
    on_export=None,
) -> dict[str, Any]:
    """Generate data (if missing), train, checkpoint, export, evaluate and export again.

    Resumes from the latest orbax checkpoint in `workdir/checkpoints`. `stop_after` ends the
    run after that many total steps without evaluating (an interruption, for tests). With
    `train.max_seconds` the whole call keeps to that wall-clock budget: data generation
    stops after `data_fraction` of it (the training set is then partial; a resumed run
    completes it), training stops `reserve_seconds` before its end and the run is then
    checkpointed, evaluated and exported as if it had reached `steps`; the learning rate
    follows the time budget (cosine over the time left after the warm-up). The weights are
    exported to `workdir/weights` before the evaluation (then `on_export(path)` is called,
    if given) and their `metrics.json` is rewritten after it. The resolved config and the
    run metadata are written to `workdir/config.yaml`.

    Returns {"start_step", "step", "stopped_by" ("steps", "time" or "stop_after"),
    "metrics" (None unless evaluated), "weights" (path or None), "train_seconds",
    "data_seconds", "train_cases"}.
    """
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from growth.inverse import count_params, create_ensemble
    from rtjax.provenance import run_metadata, write_json_atomic

    if not isinstance(config, InverseConfig):
        config = load_config(config)
    clock = _Clock.create(config.train)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tr, gen = config.train, config.generator
    resolved = {**config_to_dict(config), "run": run_metadata()}
    write_yaml(workdir / "config.yaml", resolved)

    if atlas is None and not (_dataset_complete(workdir / "data" / "train", tr.train_cases)
                              and _dataset_complete(workdir / "data" / "val", tr.val_cases)):
        atlas = load_atlas()
    # validation first: it is small, and it must be complete whatever the budget
    write_dataset(gen, workdir / "data" / "val", tr.val_cases, seed=tr.seed + _VAL_SEED_OFFSET,
                  atlas=atlas, shard_size=tr.shard_size, sim_batch=tr.sim_batch)
    write_dataset(gen, workdir / "data" / "train", tr.train_cases, seed=tr.seed, atlas=atlas,
                  shard_size=tr.shard_size, sim_batch=tr.sim_batch, deadline=clock.data_deadline)
    data_seconds = time.perf_counter() - clock.start
    train = load_dataset(workdir / "data" / "train", tr.train_cases)
    mean, scale = _target_stats(train)
    n_train = len(train["dw"])
    print(f"[train] {n_train} training cases ({data_seconds:.0f} s for data)", flush=True)
    # the training set lives on the device; a step gathers its batch there
    train_device = {k: jnp.asarray(train[k]) for k in _BATCH_KEYS}

    model = create_ensemble(config.net, tr.members, seed=tr.seed)
    optimizer = nnx.Optimizer(model, make_optimizer(tr), wrt=nnx.Param)

    manager = checkpoint_manager(workdir / "checkpoints", tr)
    start_step = 0
    latest = manager.latest_step()
    if latest is not None:
        target = {
            "model": to_single_device(nnx.to_pure_dict(nnx.state(model))),
            "opt": to_single_device(nnx.to_pure_dict(nnx.state(optimizer))),
        }
        restored = manager.restore(latest, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target["model"]),
            opt=ocp.args.StandardRestore(target["opt"]),
        ))
        for obj, key in ((model, "model"), (optimizer, "opt")):
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, restored[key])
            nnx.update(obj, state)
        start_step = int(latest)
        print(f"[train] resumed from step {start_step}", flush=True)

    make_batch = _make_batch_fn(config)
    mean_j, scale_j = jnp.asarray(mean), jnp.asarray(scale)

    @nnx.jit
    def train_step(model, optimizer, data, idx, key, lr_factor):
        batch = {k: v[idx] for k, v in data.items()}
        x, y = make_batch(batch, key, mean_j, scale_j)

        def loss_fn(model):
            pred = nnx.vmap(lambda m, xx: m(xx), in_axes=(0, 0), out_axes=0)(model, x)
            return jnp.mean((pred - y) ** 2, axis=(1, 2)).sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, lr_factor=lr_factor)
        return loss / tr.members

    def save(step):
        manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
            opt=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        ), force=True)
        manager.wait_until_finished()

    end = tr.steps if stop_after is None else min(tr.steps, stop_after)
    t_train = time.perf_counter()
    losses, done, saved, stopped_by = [], start_step, start_step, "steps"
    for step in range(start_step, end):
        if step > start_step and clock.out_of_time():  # at least one step per call
            stopped_by = "time"
            break
        if clock.train_deadline is None:
            progress = (step - tr.warmup_steps) / max(tr.steps - tr.warmup_steps, 1)
        else:
            progress = clock.progress(t_train)
        factor = learning_rate_factor(step, progress, tr.warmup_steps)
        # the batch of a step depends only on (seed, step): a resumed run sees the same data
        rng = np.random.default_rng((tr.seed, step))
        idx = rng.choice(n_train, size=min(tr.batch_size, n_train), replace=False)
        key = jax.random.fold_in(jax.random.key(tr.seed), step)
        loss = float(train_step(model, optimizer, train_device, jnp.asarray(idx), key,
                                jnp.float32(factor)))
        losses.append(loss)
        done = step + 1
        if done % tr.log_every == 0 or done == end:
            rate = (done - start_step) / (time.perf_counter() - t_train)
            print(f"[train] step {done}/{tr.steps} loss {np.mean(losses[-tr.log_every:]):.4f} "
                  f"lr x{factor:.3f} ({rate:.2f} steps/s, "
                  f"{time.perf_counter() - clock.start:.0f} s)", flush=True)
        if done % tr.checkpoint_every == 0:
            save(done)
            saved = done
    if stop_after is not None and done < tr.steps and stopped_by == "steps":
        stopped_by = "stop_after"
    if done > saved:  # where the run ends, whatever ended it
        save(done)
    if stopped_by == "time":
        print(f"[train] time budget reached after step {done}", flush=True)
    train_seconds = time.perf_counter() - t_train
    manager.close()

    result = {"start_step": start_step, "step": done, "stopped_by": stopped_by,
              "metrics": None, "weights": None, "train_seconds": train_seconds,
              "data_seconds": data_seconds, "train_cases": n_train}
    if stopped_by == "stop_after" or not evaluate_at_end:
        return result

    tail = losses[-tr.log_every:]
    summary = {
        "version": config.version,
        "members": tr.members,
        "parameters_per_member": count_params(model) // tr.members,
        "train_cases": n_train,
        "steps": done,
        "steps_configured": tr.steps,
        "stopped_by": stopped_by,
        "final_train_loss": float(np.mean(tail)) if tail else None,
        "loss_curve": _loss_summary(losses, start_step),
        "timing_seconds": {"data_generation": data_seconds, "training_this_run": train_seconds,
                           "budget": tr.max_seconds},
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        **run_metadata(),
    }
    weights = export_weights(model, config, mean, scale, {**summary, "evaluation": "pending"},
                             workdir / "weights")
    if on_export is not None:
        on_export(weights)
    val = load_dataset(workdir / "data" / "val", tr.val_cases)
    t_eval = time.perf_counter()
    try:
        metrics = evaluate(config, model, mean, scale, val, atlas=atlas)
    except Exception as err:  # noqa: BLE001 - the trained weights are exported regardless
        print(f"[train] evaluation failed: {err!r}", flush=True)
        metrics = {"evaluation_error": repr(err)}
    metrics.update(summary)
    metrics["timing_seconds"]["evaluation"] = time.perf_counter() - t_eval
    write_json_atomic(weights / "metrics.json", metrics)
    if on_export is not None:
        on_export(weights)
    metrics["timing_seconds"]["total_this_run"] = time.perf_counter() - clock.start
    result.update(metrics=metrics, weights=weights)
    print(f"[train] exported {weights} ({metrics['timing_seconds']['total_this_run']:.0f} s "
          "in all)", flush=True)
    return result


def _loss_summary(losses: list[float], start_step: int, points: int = 20) -> list[list[float]]:
    """The training loss averaged over about `points` equal windows: [[last step, mean]]."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [[start_step + int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:])]


def _dataset_complete(path: Path, n_cases: int) -> bool:
    meta = path / "dataset.json"
    if not meta.exists():
        return False
    data = json.loads(meta.read_text())
    return data.get("n_cases") == n_cases and data.get("cases", n_cases) >= n_cases


# --------------------------------------------------------------------------- evaluation


DICE_LEVELS = (0.001, 0.1, 0.25, 0.6)


def evaluate(config: InverseConfig, model, mean, scale, val: dict, *, atlas=None) -> dict:
    """Parameter errors on the held-out cases, and the Dice between the density
    re-simulated from the predicted parameters and the true density (at `DICE_LEVELS`) on
    the first `val_resim_cases`, beside a baseline that predicts the training mean
    (origin at the visible centre of mass)."""
    import jax
    import jax.numpy as jnp

    from growth.fit import dice
    from growth.inverse import anatomy_box, box_centre_mm, ensemble_apply, simulate_box, threshold_inputs

    gen = config.generator
    n = len(val["dw"])
    density = jnp.asarray(val["density"], jnp.float32)
    wm = jnp.asarray(val["wm"], jnp.float32) / 255.0
    gm = jnp.asarray(val["gm"], jnp.float32) / 255.0
    x, com = jax.vmap(lambda d, w, g, u1, uf: threshold_inputs(d, w, g, u1, uf, gen.net_spacing))(
        density, wm, gm, jnp.asarray(val["u_t1"]), jnp.asarray(val["u_fl"]))
    from flax import nnx

    apply = nnx.jit(ensemble_apply)
    preds = np.concatenate([np.asarray(apply(model, x[i : i + 16])) for i in range(0, n, 16)], axis=1)
    preds = preds * scale + mean  # (members, n, 7)
    pred = preds.mean(axis=0)
    truth = np.concatenate([
        val["origin_rel_mm"] - np.asarray(com),
        np.stack([val["sqrt_dw_t"], val["sqrt_rho_t"], val["u_t1"], val["u_fl"]], axis=1),
    ], axis=1)
    origin_err = np.linalg.norm(pred[:, :3] - truth[:, :3], axis=1)
    errors = {"origin_mm": origin_err}
    for k, name in enumerate(TARGET_NAMES[3:], start=3):
        errors[name] = np.abs(pred[:, k] - truth[:, k])
    rel = {name: np.abs(pred[:, k] - truth[:, k]) / np.abs(truth[:, k])
           for k, name in ((3, "sqrt_dw_t"), (4, "sqrt_rho_t"))}
    param = {name: {"mean": float(e.mean()), "median": float(np.median(e))} for name, e in errors.items()}
    for name, e in rel.items():
        param[name]["mean_relative"] = float(e.mean())
        param[name]["median_relative"] = float(np.median(e))
    param["ensemble_spread_mean"] = {
        name: float(preds[:, :, k].std(axis=0).mean()) for k, name in enumerate(TARGET_NAMES)
    }

    m = min(config.train.val_resim_cases, n)
    if atlas is None:
        atlas = load_atlas()
    atlas_wm, atlas_gm, atlas_spacing = (jnp.asarray(atlas[0]), jnp.asarray(atlas[1]), atlas[2])
    centre = box_centre_mm(gen)
    com_box = jnp.asarray(val["com_box_mm"]) + com  # visible COM on the network grid, box mm

    @jax.jit
    def resim(origin_atlas, transform, true_a, true_b, origin_box, a, b):
        def one(oa, tf, ta, tb, ob, pa, pb):
            w, g = anatomy_box(gen, atlas_wm, atlas_gm, atlas_spacing, oa, tf)
            c_true = simulate_box(gen, w, g, centre, ta, tb)
            c_pred = simulate_box(gen, w, g, ob, pa, pb)
            return c_true, c_pred
        return jax.vmap(one)(origin_atlas, transform, true_a, true_b, origin_box, a, b)

    base_a, base_b = float(mean[3]), float(mean[4])
    estimators = {
        "network": (com_box + pred[:, :3], pred[:, 3], pred[:, 4]),
        "baseline_mean": (com_box, np.full(n, base_a), np.full(n, base_b)),
    }
    dice_scores = {}
    for label, (origin_box, a, b) in estimators.items():
        scores = {lvl: [] for lvl in DICE_LEVELS}
        for i in range(0, m, 8):
            j = min(i + 8, m)
            c_true, c_pred = resim(
                jnp.asarray(val["origin_atlas_mm"][i:j]), jnp.asarray(val["transform"][i:j]),
                jnp.asarray(val["sqrt_dw_t"][i:j]), jnp.asarray(val["sqrt_rho_t"][i:j]),
                jnp.asarray(origin_box[i:j]), jnp.asarray(a[i:j]), jnp.asarray(b[i:j]),
            )
            c_true, c_pred = np.asarray(c_true), np.asarray(c_pred)
            for k in range(j - i):
                for lvl in DICE_LEVELS:
                    scores[lvl].append(dice(c_true[k] >= lvl, c_pred[k] >= lvl))
        dice_scores[label] = {f"c>={lvl:g}": {"mean": float(np.mean(s)), "median": float(np.median(s))}
                       for lvl, s in scores.items()}
    return {"val_cases": n, "resimulated_cases": m, "parameter_errors": param, "dice": dice_scores}


# --------------------------------------------------------------------------- weights


def export_weights(model, config: InverseConfig, mean, scale, metrics: dict, out_dir) -> Path:
    """Write a weights folder: `params/` (orbax, model parameters only), `config.yaml`
    (with the target normalisation) and `metrics.json`. Replaces an existing folder."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from rtjax.provenance import write_json_atomic

    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "params", params)
    write_yaml(out_dir / "config.yaml", {
        **config_to_dict(config),
        "normalisation": {"targets": list(TARGET_NAMES), "mean": [float(v) for v in mean],
                          "scale": [float(v) for v in scale]},
    })
    write_json_atomic(out_dir / "metrics.json", metrics)
    return out_dir


@dataclass(frozen=True)
class InverseWeights:
    """A loaded inverse model: the ensemble, its config and target normalisation."""

    model: Any
    config: InverseConfig
    mean: np.ndarray
    scale: np.ndarray
    path: Path

    @property
    def version(self) -> str:
        return self.config.version

    @functools.cached_property
    def apply(self):
        """jit-compiled (1, n, n, n, 4) -> (members, 1, 7) in physical units."""
        import jax
        from flax import nnx

        from growth.inverse import ensemble_apply

        graphdef, state = nnx.split(self.model)
        mean, scale = self.mean, self.scale
        run = jax.jit(lambda st, x: ensemble_apply(nnx.merge(graphdef, st), x) * scale + mean)
        return lambda x: run(state, x)


@functools.lru_cache(maxsize=4)
def _load_weights_cached(path: Path) -> InverseWeights:
    import yaml
    import orbax.checkpoint as ocp
    from flax import nnx

    from growth.inverse import create_ensemble

    if not (path / "config.yaml").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path} is not an inverse-model weights folder "
                                "(needs config.yaml and params/)")
    data = yaml.safe_load((path / "config.yaml").read_text())
    norm = data.pop("normalisation")
    config = config_from_dict(data)
    abstract = nnx.eval_shape(lambda: create_ensemble(config.net, config.train.members))
    graphdef, state = nnx.split(abstract)
    target = to_single_device(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "params", target)
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    return InverseWeights(model=model, config=config, mean=np.asarray(norm["mean"], np.float32),
                          scale=np.asarray(norm["scale"], np.float32), path=path)


def load_weights(path: str | Path | None = None) -> InverseWeights:
    """Load a weights folder (default: the shipped `rtjax/weights/inverse`); cached."""
    return _load_weights_cached(Path(path or DEFAULT_WEIGHTS).resolve())


# --------------------------------------------------------------------------- predict


def predict(core, edema, wm, gm, spacing, *, weights=None) -> dict[str, Any]:
    """The network's estimate for one case.

    Args:
        core, edema: boolean masks (tumour core = enhancing + necrosis; edema), canonical.
        wm, gm: tissue probabilities on the same grid.
        spacing: voxel size, mm (3 values).
        weights: None (shipped), a weights folder, or a loaded `InverseWeights`.

    Returns:
        origin_mm: the origin in grid mm of the input array (voxel index * spacing), (3,);
        origin_vox: the same in voxels; sqrt_dw_t (mm), sqrt_rho_t, u_t1, u_fl: ensemble
        means, clipped to the trained ranges; ensemble_spread: their standard deviations
        over members (origin_mm per axis); members: per-member values; crop_centre_vox;
        weights_version; warnings (e.g. a tumour larger than the network's field of view).

    Raises:
        ValueError: empty masks or mismatched shapes.
    """
    import jax.numpy as jnp

    from growth.inverse import crop_around, masks_to_inputs

    w = weights if isinstance(weights, InverseWeights) else load_weights(weights)
    gen = w.config.generator
    core, edema = np.asarray(core, bool), np.asarray(edema, bool)
    shapes = {np.shape(a) for a in (core, edema, wm, gm)}
    if len(shapes) != 1 or core.ndim != 3:
        raise ValueError(f"core, edema, wm, gm must be 3-D arrays of one shape, got {shapes}")
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    visible = core | edema
    if not visible.any():
        raise ValueError("the tumour masks are empty: nothing to fit")
    centre_vox = np.argwhere(visible).mean(axis=0)
    crops = crop_around(
        tuple(jnp.asarray(a, jnp.float32) for a in (core, edema, wm, gm)),
        centre_vox, spacing, gen.net_shape, gen.net_spacing,
    )
    x, com = masks_to_inputs(*crops, gen.net_spacing)
    out = np.asarray(w.apply(x[None]))[:, 0, :].astype(np.float64)  # (members, 7)
    r = gen.ranges
    origin = centre_vox * spacing + np.asarray(com, np.float64) + out[:, :3]
    values = {
        "origin_mm": origin,
        "sqrt_dw_t": np.clip(out[:, 3], 0.1, r.sqrt_dw_t_max),
        "sqrt_rho_t": np.clip(out[:, 4], 0.1, None),
        "u_t1": np.clip(out[:, 5], *r.u_t1),
        "u_fl": np.clip(out[:, 6], *r.u_fl),
    }
    warnings = []
    border = np.asarray(x[..., 0] + x[..., 1] > 0)
    if border[[0, -1]].any() or border[:, [0, -1]].any() or border[:, :, [0, -1]].any():
        warnings.append(
            f"the visible tumour reaches the border of the network's {gen.fov_mm:g} mm field "
            "of view: it is larger than the training cases, the estimate is unreliable"
        )
    result = {
        "origin_mm": values["origin_mm"].mean(axis=0),
        "origin_vox": values["origin_mm"].mean(axis=0) / spacing,
        **{k: float(values[k].mean()) for k in ("sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")},
        "ensemble_spread": {
            "origin_mm": values["origin_mm"].std(axis=0),
            **{k: float(values[k].std()) for k in ("sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")},
        },
        "members": {k: v.tolist() for k, v in values.items()},
        "crop_centre_vox": centre_vox,
        "weights_version": w.version,
        "warnings": warnings,
    }
    return result


# --------------------------------------------------------------------------- device job


_FIT_TIMING_SEED = 424_242  # held-out cases of the device job's fit timing


def generation_throughput(gen: GeneratorConfig, atlas, batch: int, *, seed: int = 7) -> dict:
    """Time one vmapped generator batch of `batch` simulations (compiled first, then timed).

    Returns simulations/s, accepted/s, the acceptance rate, the batch's explicit steps
    (its slowest member's) and the effective voxel-steps/s (batch x steps x box voxels).
    """
    import jax

    from growth.inverse import draw_cases, simulate_cases

    wm, gm, spacing = atlas
    rng = np.random.default_rng(seed)
    cases = draw_cases(gen, (np.asarray(wm) + np.asarray(gm)) >= gen.origin_tissue_min,
                       spacing, rng, batch)
    jax.block_until_ready(simulate_cases(gen, wm, gm, spacing, cases))  # compile (or cache)
    start = time.perf_counter()
    out = jax.device_get(simulate_cases(gen, wm, gm, spacing, cases))
    seconds = time.perf_counter() - start
    steps = int(math.ceil(float(np.max(cases["sqrt_dw_t"])) ** 2 / gen.d_ref / gen.dt))
    accepted = int(np.sum(out["accepted"]))
    return {"batch": batch, "seconds": seconds, "simulations_per_s": batch / seconds,
            "accepted_per_s": accepted / seconds, "acceptance": accepted / batch,
            "steps": steps, "box_voxels": gen.sim_shape**3,
            "voxel_steps_per_s": batch * steps * gen.sim_shape**3 / seconds}


def _tar_weights(weights: Path, out_path: Path) -> Path:
    """`weights` as a .tar.gz holding one folder `inverse/` (the shipped layout of
    `rtjax/weights/inverse`), written atomically."""
    import tarfile

    from rtjax.provenance import atomic_write

    def write(tmp: str) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(weights, arcname="inverse")

    return atomic_write(out_path, write)


def device_job(
    config: InverseConfig,
    budget_s: float,
    out_dir: str | Path,
    *,
    workdir: str | Path,
    fit_share: float = 0.28,
    fit_cases: int = 8,
    fit_iterations: int | None = None,
    started: float | None = None,
) -> dict:
    """Train, measure and time the inverse model within `budget_s` seconds of wall time.

    1. `train_and_evaluate` with `max_seconds` = the budget less `fit_share` of it (and 5 s
       for the outputs), data generation included; the weights go to
       `out_dir/inverse_weights.tar.gz` as soon as training stops (and again with the
       validation metrics).
    2. Data-generation throughput: one timed vmapped batch (`generation_throughput`).
    3. Network + refinement time per case (`rtjax.fit_evaluation.fit_held_out_case`) on
       held-out simulated cases of the new weights; a case starts only when 1.5 times the
       last one's time is left.
    `out_dir/inverse_metrics.json` is rewritten after every stage. `started` is the
    `time.perf_counter()` at which the budget began (default: now).
    """
    import jax

    from rtjax.provenance import run_metadata, write_json_atomic

    started = time.perf_counter() if started is None else started
    deadline = started + budget_s
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "inverse_metrics.json"
    train_budget = budget_s * (1.0 - fit_share) - 5.0 - (time.perf_counter() - started)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_seconds=train_budget))
    report: dict[str, Any] = {
        "budget_s": budget_s, "train_budget_s": train_budget, "config": config_to_dict(config),
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})", **run_metadata(),
    }
    print(f"[job] {report['device']}: budget {budget_s:.0f} s, training {train_budget:.0f} s",
          flush=True)

    def stage(name: str, value) -> None:
        report[name] = value
        report["elapsed_s"] = time.perf_counter() - started
        write_json_atomic(metrics_path, report)

    def exported(path) -> None:  # after training, and again after the evaluation
        _tar_weights(Path(path), out_dir / "inverse_weights.tar.gz")
        stage("training", json.loads((Path(path) / "metrics.json").read_text()))

    atlas = load_atlas()
    result = train_and_evaluate(config, workdir, atlas=atlas, on_export=exported)
    stage("training", {k: result[k] for k in ("start_step", "step", "stopped_by", "train_seconds",
                                              "data_seconds", "train_cases")} | result["metrics"])

    try:
        throughput = generation_throughput(config.generator, atlas, config.train.sim_batch)
        throughput["dataset_accepted_per_s"] = result["train_cases"] / max(result["data_seconds"], 1e-9)
        print(f"[job] generation: {throughput['simulations_per_s']:.1f} simulations/s "
              f"({throughput['voxel_steps_per_s'] / 1e9:.2f} G voxel-steps/s)", flush=True)
    except Exception as err:  # noqa: BLE001 - a failed measurement must not stop the job
        throughput = {"error": repr(err)}
        print(f"[job] throughput measurement failed: {err!r}", flush=True)
    stage("generation_throughput", throughput)
    try:
        _time_fits(config, result["weights"], atlas, deadline, fit_cases, fit_iterations, stage)
    except Exception as err:  # noqa: BLE001
        stage("fit_timing_error", repr(err))
        print(f"[job] fit timing failed: {err!r}", flush=True)
    print(f"[job] done in {time.perf_counter() - started:.0f} s of {budget_s:.0f} s", flush=True)
    return report


def _time_fits(config, weights_path, atlas, deadline, fit_cases, fit_iterations, stage) -> None:
    """Stage 3 of `device_job`: network + refinement seconds per held-out case."""
    from growth.fit import FitConfig
    from rtjax.fit_evaluation import LEVELS, fit_held_out_case, format_fit_table, held_out_cases

    fit_iterations = FitConfig().max_iterations if fit_iterations is None else fit_iterations
    fit_stage = {"iterations": fit_iterations, "seed": _FIT_TIMING_SEED, "cases": []}
    weights = load_weights(weights_path)
    spacing = (config.generator.net_spacing,) * 3
    cases = held_out_cases(config.generator, fit_cases, seed=_FIT_TIMING_SEED, atlas=atlas,
                           batch_size=config.train.sim_batch)
    for case in cases:
        last = fit_stage["cases"][-1] if fit_stage["cases"] else None
        need = 0.0 if last is None else 1.5 * (last["network"]["seconds"] + last["refined"]["seconds"])
        if time.perf_counter() + need >= deadline - 3.0:
            break
        fit_stage["cases"].append(fit_held_out_case(case, spacing, weights=weights,
                                                    iterations=fit_iterations))
        seconds = [c["refined"]["seconds"] for c in fit_stage["cases"]]
        fit_stage.update({
            "seconds_per_case": seconds,
            "mean_s_per_case": float(np.mean(seconds)),
            "mean_s_per_case_after_first": float(np.mean(seconds[1:])) if len(seconds) > 1 else None,
            "table": format_fit_table({"levels": list(LEVELS), "seed": _FIT_TIMING_SEED,
                                       "weights_version": weights.version,
                                       "cases": fit_stage["cases"]}),
        })
        stage("fit_timing", fit_stage)
        print(f"[job] fit case {len(seconds)}: network + refinement {seconds[-1]:.1f} s", flush=True)
    if fit_stage["cases"]:
        print(fit_stage["table"], flush=True)
