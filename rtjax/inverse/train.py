"""Training of the inverse model: simulated data, an ensemble trained with optax, orbax
checkpoints that resume, validation and the shipped weights layout.

`train_and_evaluate(config, workdir)` generates (or reuses) the simulated datasets as npz
shards under `workdir/data` (`rtjax.inverse.dataset`), trains an ensemble (AdamW, warm-up
+ cosine computed on the host), checkpoints every `checkpoint_every` steps into
`workdir/checkpoints` and resumes from the latest one, exports `workdir/weights`
(`rtjax.inverse.weights`), validates on held-out simulations (another seed: never seen
in training; `rtjax.inverse.evaluate`) and rewrites the weights' `metrics.json`. With
`train.max_seconds` the whole call keeps to that wall-clock budget.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from growth.inverse import threshold_inputs
from rtjax.atlas import atlas_arrays
from rtjax.config import to_dict, write_yaml
from rtjax.inverse.config import InverseConfig, TrainConfig, load_config
from rtjax.inverse.dataset import dataset_complete, load_dataset, write_dataset
from rtjax.inverse.evaluate import evaluate
from rtjax.inverse.network import create_ensemble
from rtjax.inverse.weights import export_weights
from rtjax.ml import TimeBudget, TrainCheckpoints, count_params, learning_rate_factor, scale_by_factor
from rtjax.provenance import run_metadata, write_json_atomic

__all__ = [
    "VAL_SEED_OFFSET",
    "target_stats",
    "make_batch_fn",
    "make_optimizer",
    "create_train_state",
    "make_train_step",
    "prepare_data",
    "train_loop",
    "train_and_evaluate",
]

#: The validation stream's seed offset: a seed the training stream never uses.
VAL_SEED_OFFSET = 1_000_003

_BATCH_KEYS = ("density", "wm", "gm", "origin_rel_mm", "sqrt_dw_t", "sqrt_rho_t", "u_t1", "u_fl")


def target_stats(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Normalisation of the targets: mean and scale per output, from the training set."""
    a = data["sqrt_dw_t"].astype(np.float64)
    b = data["sqrt_rho_t"].astype(np.float64)
    off = np.abs(data["origin_rel_mm"]).astype(np.float64)
    off_scale = max(float(np.sqrt((off**2).mean())), 1.0)
    mean = np.array([0.0, 0.0, 0.0, a.mean(), b.mean(), 0.675, 0.275])
    scale = np.array([off_scale] * 3 + [a.std() + 1e-3, b.std() + 1e-3, 0.1, 0.13])
    return mean.astype(np.float32), scale.astype(np.float32)


def make_batch_fn(config: InverseConfig):
    """jit-able (arrays, key, mean, scale) -> (inputs (K, B, n, n, n, 4), normalised
    targets (K, B, 7)).

    Per member and sample: thresholds redrawn (if configured), random LR flip, inputs from
    thresholding the stored density, target origin relative to the visible centre of mass.
    """
    gen, tr = config.generator, config.train

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
        keys = jax.random.split(key, (tr.members, density.shape[0]))
        per_sample = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0))
        per_member = jax.vmap(per_sample, in_axes=(0,) + (None,) * 8)
        x, y = per_member(keys, density, wm, gm, batch["origin_rel_mm"], batch["sqrt_dw_t"],
                          batch["sqrt_rho_t"], batch["u_t1"], batch["u_fl"])
        return x, (y - mean) / scale

    return make


def make_optimizer(tr: TrainConfig):
    """Gradient clipping, AdamW at the peak rate, then the host-side schedule factor."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(tr.learning_rate, weight_decay=tr.weight_decay),
        scale_by_factor(),
    )


def create_train_state(config: InverseConfig):
    """(model, optimizer): a fresh ensemble and its `nnx.Optimizer`."""
    model = create_ensemble(config.net, config.train.members, seed=config.train.seed)
    return model, nnx.Optimizer(model, make_optimizer(config.train), wrt=nnx.Param)


def make_train_step(config: InverseConfig, mean, scale):
    """nnx.jit (model, optimizer, data, idx, key, lr_factor) -> loss: draws the batch
    `idx` from the device-resident training set, MSE of the normalised targets summed
    over members, one optimizer update."""
    make_batch = make_batch_fn(config)
    mean_j, scale_j = jnp.asarray(mean), jnp.asarray(scale)
    members = config.train.members

    @nnx.jit
    def train_step(model, optimizer, data, idx, key, lr_factor):
        batch = {k: v[idx] for k, v in data.items()}
        x, y = make_batch(batch, key, mean_j, scale_j)

        def loss_fn(model):
            pred = nnx.vmap(lambda m, xx: m(xx), in_axes=(0, 0), out_axes=0)(model, x)
            return jnp.mean((pred - y) ** 2, axis=(1, 2)).sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, lr_factor=lr_factor)
        return loss / members

    return train_step


def prepare_data(config: InverseConfig, workdir: Path, atlas, data_deadline):
    """Write the validation set (always whole) and the training set (until
    `data_deadline`) under `workdir/data`; the atlas is loaded only when needed.
    Returns the atlas arrays (None when they were not needed)."""
    tr, gen = config.train, config.generator
    data = workdir / "data"
    if atlas is None and not (dataset_complete(data / "train", tr.train_cases)
                              and dataset_complete(data / "val", tr.val_cases)):
        atlas = atlas_arrays()
    write_dataset(gen, data / "val", tr.val_cases, seed=tr.seed + VAL_SEED_OFFSET,
                  atlas=atlas, shard_size=tr.shard_size, sim_batch=tr.sim_batch)
    write_dataset(gen, data / "train", tr.train_cases, seed=tr.seed, atlas=atlas,
                  shard_size=tr.shard_size, sim_batch=tr.sim_batch, deadline=data_deadline)
    return atlas


def _save(checkpoints: TrainCheckpoints, step: int, model, optimizer) -> None:
    checkpoints.save(step, nnx.state(model), nnx.state(optimizer))


def _restore(checkpoints: TrainCheckpoints, model, optimizer) -> int:
    """Restore the latest checkpoint into model and optimizer; its step (0: none)."""
    latest = checkpoints.latest_step()
    if latest is None:
        return 0
    params, opt = checkpoints.restore(latest, nnx.state(model), nnx.state(optimizer))
    nnx.update(model, params)
    nnx.update(optimizer, opt)
    print(f"[train] resumed from step {latest}", flush=True)
    return int(latest)


def train_loop(config, step_fn, model, optimizer, train_device, n_train, checkpoints, *,
               start_step: int, end: int, deadline, budget: TimeBudget):
    """Steps `start_step` .. `end` (or until `deadline`), checkpointing every
    `checkpoint_every` steps and where the loop ends. The batch of a step depends only on
    (seed, step), so a resumed run sees the same data. Returns (losses, last step,
    "steps" or "time")."""
    tr = config.train
    t_train = time.perf_counter()
    losses, done, saved, stopped_by = [], start_step, start_step, "steps"
    for step in range(start_step, end):
        if step > start_step and TimeBudget.passed(deadline):  # at least one step per call
            stopped_by = "time"
            break
        if deadline is None:
            progress = (step - tr.warmup_steps) / max(tr.steps - tr.warmup_steps, 1)
        else:
            progress = TimeBudget.fraction_spent(t_train, deadline)
        factor = learning_rate_factor(step, progress, tr.warmup_steps)
        rng = np.random.default_rng((tr.seed, step))
        idx = rng.choice(n_train, size=min(tr.batch_size, n_train), replace=False)
        key = jax.random.fold_in(jax.random.key(tr.seed), step)
        losses.append(float(step_fn(model, optimizer, train_device, jnp.asarray(idx), key,
                                    jnp.float32(factor))))
        done = step + 1
        if done % tr.log_every == 0 or done == end:
            rate = (done - start_step) / (time.perf_counter() - t_train)
            print(f"[train] step {done}/{tr.steps} loss {np.mean(losses[-tr.log_every:]):.4f} "
                  f"lr x{factor:.3f} ({rate:.2f} steps/s, {budget.elapsed():.0f} s)", flush=True)
        if done % tr.checkpoint_every == 0:
            _save(checkpoints, done, model, optimizer)
            saved = done
    if done > saved:  # where the run ends, whatever ended it
        _save(checkpoints, done, model, optimizer)
    if stopped_by == "time":
        print(f"[train] time budget reached after step {done}", flush=True)
    return losses, done, stopped_by


def _loss_summary(losses: list[float], start_step: int, points: int = 20) -> list[list[float]]:
    """The training loss averaged over about `points` equal windows: [[last step, mean]]."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).astype(int)
    return [[start_step + int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:])]


def _summary(config, model, losses, start_step, done, stopped_by, n_train, timing) -> dict:
    tr = config.train
    tail = losses[-tr.log_every:]
    return {
        "version": config.version,
        "members": tr.members,
        "parameters_per_member": count_params(model) // tr.members,
        "train_cases": n_train,
        "steps": done,
        "steps_configured": tr.steps,
        "stopped_by": stopped_by,
        "final_train_loss": float(np.mean(tail)) if tail else None,
        "loss_curve": _loss_summary(losses, start_step),
        "timing_seconds": {**timing, "budget": tr.max_seconds},
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        **run_metadata(),
    }


def _export_and_evaluate(config, workdir, model, mean, scale, summary, atlas, on_export):
    """Export the weights (metrics pending), validate, rewrite metrics.json; on_export is
    called after each write. Returns (weights path, metrics)."""
    weights = export_weights(model, config, mean, scale, {**summary, "evaluation": "pending"},
                             workdir / "weights")
    if on_export is not None:
        on_export(weights)
    val = load_dataset(workdir / "data" / "val", config.train.val_cases)
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
    return weights, metrics


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
    if not isinstance(config, InverseConfig):
        config = load_config(config)
    tr = config.train
    budget = TimeBudget.starting_now(tr.max_seconds)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_yaml(workdir / "config.yaml", {**to_dict(config), "run": run_metadata()})

    atlas = prepare_data(config, workdir, atlas, budget.deadline(tr.data_fraction))
    data_seconds = budget.elapsed()
    train = load_dataset(workdir / "data" / "train", tr.train_cases)
    mean, scale = target_stats(train)
    n_train = len(train["dw"])
    print(f"[train] {n_train} training cases ({data_seconds:.0f} s for data)", flush=True)
    train_device = {k: jnp.asarray(train[k]) for k in _BATCH_KEYS}  # batches gathered on the device

    model, optimizer = create_train_state(config)
    end = tr.steps if stop_after is None else min(tr.steps, stop_after)
    t_train = time.perf_counter()
    with TrainCheckpoints(workdir / "checkpoints", tr.keep_checkpoints) as checkpoints:
        start_step = _restore(checkpoints, model, optimizer)
        losses, done, stopped_by = train_loop(
            config, make_train_step(config, mean, scale), model, optimizer, train_device, n_train,
            checkpoints, start_step=start_step, end=end,
            deadline=budget.deadline(reserve=tr.reserve_seconds), budget=budget)
    train_seconds = time.perf_counter() - t_train
    if stop_after is not None and done < tr.steps and stopped_by == "steps":
        stopped_by = "stop_after"
    result = {"start_step": start_step, "step": done, "stopped_by": stopped_by,
              "metrics": None, "weights": None, "train_seconds": train_seconds,
              "data_seconds": data_seconds, "train_cases": n_train}
    if stopped_by == "stop_after" or not evaluate_at_end:
        return result
    summary = _summary(config, model, losses, start_step, done, stopped_by, n_train,
                       {"data_generation": data_seconds, "training_this_run": train_seconds})
    weights, metrics = _export_and_evaluate(config, workdir, model, mean, scale, summary, atlas, on_export)
    metrics["timing_seconds"]["total_this_run"] = budget.elapsed()
    result.update(metrics=metrics, weights=weights)
    print(f"[train] exported {weights} ({metrics['timing_seconds']['total_this_run']:.0f} s in all)",
          flush=True)
    return result
