"""Training, shipping and use of the learned inverse model (`growth.inverse`).

* `load_config(path)` reads a YAML config (see `configs/inverse_cpu.yaml`): `generator`
  (`growth.inverse.GeneratorConfig`), `net` (`growth.inverse.NetConfig`), `train`
  (`TrainConfig`) and a `version` string.
* `train_and_evaluate(config, workdir)`: generates (or reuses) the simulated datasets as
  npz shards under `workdir/data`, trains an ensemble with optax (AdamW, warm-up + cosine),
  saves orbax checkpoints every `checkpoint_every` steps and resumes from the latest one,
  evaluates on held-out simulations (another seed: never seen in training) and writes
  `workdir/weights/` in the shipped layout (`params/` orbax checkpoint of the model only,
  `config.yaml`, `metrics.json`).
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
    "train_and_evaluate",
    "evaluate",
    "export_weights",
    "load_weights",
    "predict",
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


@dataclass(frozen=True)
class InverseConfig:
    """The whole configuration of an inverse-model run."""

    version: str = "dev"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_keys(cls, data: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")


def config_from_dict(data: dict) -> InverseConfig:
    """Build an `InverseConfig` from a mapping; unknown keys are errors."""
    data = dict(data or {})
    _check_keys(InverseConfig, data, "config")
    gen_data = dict(data.get("generator") or {})
    gen = GeneratorConfig.from_dict(gen_data)
    net_data = dict(data.get("net") or {})
    if "net_shape" in net_data and int(net_data["net_shape"]) != gen.net_shape:
        raise ValueError("net.net_shape must equal generator.net_shape (or be left out)")
    net_data["net_shape"] = gen.net_shape
    net = NetConfig.from_dict(net_data)
    train_data = dict(data.get("train") or {})
    _check_keys(TrainConfig, train_data, "config.train")
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


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


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
) -> Path:
    """Simulate `n_cases` accepted cases into npz shards `out_dir/shard_XXXXX.npz`.

    Shard k is generated from its own stream (seed, k), so an interrupted run resumes at
    the first missing shard; shards are written atomically. `dataset.json` records the
    generator config and the counts. Tissue is stored as uint8 (1/255), density as float16.
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
    for k in range(n_shards):
        path = out_dir / f"shard_{k:05d}.npz"
        want = min(shard_size, n_cases - k * shard_size)
        if path.exists():
            continue
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
        if progress:
            done = min((k + 1) * shard_size, n_cases)
            print(f"[data] {out_dir.name}: {done}/{n_cases} cases "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    write_json_atomic(meta_path, {"generator": gen_dict, "seed": seed, "n_cases": n_cases,
                                  "shard_size": shard_size, **run_metadata()})
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


def _checkpoint_manager(directory: Path, tr: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=tr.keep_checkpoints, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _single_device(tree):
    """Abstract arrays placed on the default device (a checkpoint written on a GPU then
    restores on a CPU-only machine)."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train_and_evaluate(
    config: InverseConfig | str | Path,
    workdir: str | Path,
    *,
    stop_after: int | None = None,
    evaluate_at_end: bool = True,
    atlas=None,
) -> dict[str, Any]:
    """Generate data (if missing), train, checkpoint, evaluate and export the weights.

    Resumes from the latest orbax checkpoint in `workdir/checkpoints`. `stop_after` ends the
    run after that many total steps without evaluating (an interruption, for tests). The
    resolved config and the run metadata are written to `workdir/config.yaml`.

    Returns {"start_step", "step", "metrics" (None unless evaluated), "weights" (path or
    None), "train_seconds"}.
    """
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx

    from growth.inverse import count_params, create_ensemble
    from rtjax.provenance import run_metadata

    if not isinstance(config, InverseConfig):
        config = load_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tr, gen = config.train, config.generator
    resolved = {**config_to_dict(config), "run": run_metadata()}
    _write_yaml(workdir / "config.yaml", resolved)

    t0 = time.perf_counter()
    if atlas is None and not (_dataset_complete(workdir / "data" / "train", tr.train_cases)
                              and _dataset_complete(workdir / "data" / "val", tr.val_cases)):
        atlas = load_atlas()
    write_dataset(gen, workdir / "data" / "train", tr.train_cases, seed=tr.seed, atlas=atlas,
                  shard_size=tr.shard_size, sim_batch=tr.sim_batch)
    write_dataset(gen, workdir / "data" / "val", tr.val_cases, seed=tr.seed + _VAL_SEED_OFFSET,
                  atlas=atlas, shard_size=tr.shard_size, sim_batch=tr.sim_batch)
    data_seconds = time.perf_counter() - t0
    train = load_dataset(workdir / "data" / "train", tr.train_cases)
    mean, scale = _target_stats(train)
    n_train = len(train["dw"])

    model = create_ensemble(config.net, tr.members, seed=tr.seed)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tr.learning_rate, max(tr.warmup_steps, 1), max(tr.steps, tr.warmup_steps + 1),
        end_value=tr.learning_rate * 0.02,
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=tr.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    manager = _checkpoint_manager(workdir / "checkpoints", tr)
    start_step = 0
    latest = manager.latest_step()
    if latest is not None:
        target = {
            "model": _single_device(nnx.to_pure_dict(nnx.state(model))),
            "opt": _single_device(nnx.to_pure_dict(nnx.state(optimizer))),
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
    def train_step(model, optimizer, batch, key):
        x, y = make_batch(batch, key, mean_j, scale_j)

        def loss_fn(model):
            pred = nnx.vmap(lambda m, xx: m(xx), in_axes=(0, 0), out_axes=0)(model, x)
            return jnp.mean((pred - y) ** 2, axis=(1, 2)).sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss / tr.members

    def save(step):
        manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
            opt=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        ), force=True)
        manager.wait_until_finished()

    end = tr.steps if stop_after is None else min(tr.steps, stop_after)
    t_train = time.perf_counter()
    losses = []
    for step in range(start_step, end):
        # the batch of a step depends only on (seed, step): a resumed run sees the same data
        rng = np.random.default_rng((tr.seed, step))
        idx = rng.choice(n_train, size=min(tr.batch_size, n_train), replace=False)
        batch = {k: jnp.asarray(train[k][idx]) for k in _BATCH_KEYS}
        loss = float(train_step(model, optimizer, batch, jax.random.fold_in(jax.random.key(tr.seed), step)))
        losses.append(loss)
        done = step + 1
        if done % tr.log_every == 0 or done == end:
            rate = (done - start_step) / (time.perf_counter() - t_train)
            print(f"[train] step {done}/{tr.steps} loss {np.mean(losses[-tr.log_every:]):.4f} "
                  f"({rate:.2f} steps/s)", flush=True)
        if done % tr.checkpoint_every == 0 or done == end:
            save(done)
    train_seconds = time.perf_counter() - t_train
    final_step = max(end, start_step)
    manager.close()

    result = {"start_step": start_step, "step": final_step, "metrics": None, "weights": None,
              "train_seconds": train_seconds, "data_seconds": data_seconds}
    if final_step < tr.steps or not evaluate_at_end:
        return result

    val = load_dataset(workdir / "data" / "val", tr.val_cases)
    t_eval = time.perf_counter()
    metrics = evaluate(config, model, mean, scale, val, atlas=atlas)
    metrics.update({
        "version": config.version,
        "members": tr.members,
        "parameters_per_member": count_params(model) // tr.members,
        "train_cases": n_train,
        "steps": tr.steps,
        "final_train_loss": float(np.mean(losses[-tr.log_every:])) if losses else None,
        "timing_seconds": {"data_generation": data_seconds, "training_this_run": train_seconds,
                           "evaluation": time.perf_counter() - t_eval},
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        **run_metadata(),
    })
    weights = export_weights(model, config, mean, scale, metrics, workdir / "weights")
    result.update(metrics=metrics, weights=weights)
    return result


def _dataset_complete(path: Path, n_cases: int) -> bool:
    meta = path / "dataset.json"
    return meta.exists() and json.loads(meta.read_text()).get("n_cases") == n_cases


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
    dice = {}
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
        dice[label] = {f"c>={lvl:g}": {"mean": float(np.mean(s)), "median": float(np.median(s))}
                       for lvl, s in scores.items()}
    return {"val_cases": n, "resimulated_cases": m, "parameter_errors": param, "dice": dice}


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
    _write_yaml(out_dir / "config.yaml", {
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
    target = _single_device(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
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
