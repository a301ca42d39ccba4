"""Training of the segmentation ensemble: synthetic base model, leave-one-out fine-tunes on
the real cases, final fine-tune, shipped weights.

`train_and_evaluate(config, workdir)` runs four stages, each resumable from its orbax
checkpoints in `workdir/checkpoints/<stage>`:

1. **bank**: FK tumours (`rtjax.seg.synth.build_bank`), cached as `workdir/bank.npz`;
2. **base**: the ensemble trained on synthetic patches rendered on the fly (and a share
   `base_real_fraction` of real patches, 0 by default so that no real case is seen);
3. **loo**: per real case, a copy of the base model fine-tuned on the other real cases
   (mixed with synthetic patches) and scored on the held-out case with sliding-window
   inference at the original resolution (Dice and HD95 per region, `loo/<case>.json`);
4. **final**: the base model fine-tuned on every real case, exported to `workdir/weights`
   (`params/` orbax, `config.yaml`, `metrics.json`, `MODEL_CARD.md`).

A wall-clock budget (`train.max_seconds` or the `max_seconds` argument) is split over the
stages by `train.stage_fractions` (time left by a stage passes to the next); a stage that
runs out saves a checkpoint and the run moves on, so the run always ends with weights.
The learning rate follows a cosine over the larger of step and time progress. Every
patch is made on the device inside the jitted step; one compilation serves all stages.
"""

from __future__ import annotations

import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from rtjax.config import write_yaml
from rtjax.metrics import region_metrics
from rtjax.ml import TrainCheckpoints, learning_rate_factor, save_weights
from rtjax.provenance import run_metadata, write_json_atomic
from rtjax.seg.config import SegConfig, config_to_dict, load_config
from rtjax.seg.data import find_real_cases, load_real_case, resolve_data_root
from rtjax.seg.grid import resample_to_shape, working_shape
from rtjax.seg.infer import SegWeights, predict_regions, probs_to_case_masks
from rtjax.seg.model import count_params, create_ensemble
from rtjax.seg.synth import build_bank, load_bank, render_sample, save_bank

__all__ = [
    "prepare_real",
    "make_train_step",
    "region_loss",
    "train_stage",
    "evaluate_case",
    "export_weights",
    "model_card",
    "summarise",
    "train_and_evaluate",
]

_SAMPLES_PER_CASE = 512  # tumour / brain voxel centres kept per real case


def _log(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, flush=True)


# --------------------------------------------------------------------------- real patches


def prepare_real(cases, cfg: SegConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Real cases at the working resolution, padded to one shape for on-device patches.

    Returns x (R, S0, S1, S2, 2) float32, y (R, S0, S1, S2, 3) uint8 (WT/TC/ET), fg and
    anywhere (R, M, 3) int32 centres (tumour voxels; brain voxels) in unpadded working
    voxels (the arrays are padded by patch // 2 before each axis). With no case: one
    empty dummy (never sampled).
    """

    p = cfg.render.patch
    rng = np.random.default_rng(seed)
    if not cases:
        z = np.zeros((1, p, p, p), np.float32)
        return {"x": np.stack([z, z], -1), "y": np.zeros((1, p, p, p, 3), np.uint8),
                "fg": np.zeros((1, 1, 3), np.int32), "anywhere": np.zeros((1, 1, 3), np.int32)}
    xs, ys, fgs, anys = [], [], [], []
    for case in cases:
        shape = working_shape(case.x.shape[:3], case.spacing, cfg.render.spacing)
        xs.append(resample_to_shape(case.x, shape))
        ys.append((resample_to_shape(case.regions, shape) >= 0.5).astype(np.uint8))
        brain = resample_to_shape(case.brain.astype(np.float32), shape) >= 0.5
        for mask, out in ((ys[-1][..., 0] > 0, fgs), (brain, anys)):
            idx = np.argwhere(mask if mask.any() else brain)
            out.append(idx[rng.integers(0, len(idx), _SAMPLES_PER_CASE)].astype(np.int32))
    size = np.max([a.shape[:3] for a in xs], axis=0) + p

    def pad(a):
        before = [p // 2] * 3
        after = [int(s - n - p // 2) for s, n in zip(size, a.shape[:3])]
        return np.pad(a, list(zip(before, after)) + [(0, 0)])

    return {"x": np.stack([pad(a) for a in xs]), "y": np.stack([pad(a) for a in ys]),
            "fg": np.stack(fgs), "anywhere": np.stack(anys)}


def _real_sample(key, real, case_weights, cfg: SegConfig):

    p = cfg.render.patch
    k = jax.random.split(key, 7)
    i = jax.random.choice(k[0], case_weights.shape[0], p=case_weights / case_weights.sum())
    j = jax.random.randint(k[1], (), 0, real["fg"].shape[1])
    use_fg = jax.random.bernoulli(k[2], cfg.train.foreground_fraction)
    centre = jnp.where(use_fg, real["fg"][i, j], real["anywhere"][i, j])
    jitter = jax.random.randint(k[3], (3,), -(p // 4), p // 4 + 1)
    limit = jnp.asarray(real["x"].shape[1:4]) - p
    start = jnp.clip(centre + jitter, 0, limit)
    x = lax.dynamic_slice(real["x"], (i, *start, 0), (1, p, p, p, 2))[0]
    y = lax.dynamic_slice(real["y"], (i, *start, 0), (1, p, p, p, 3))[0].astype(jnp.float32)
    flips = jax.random.bernoulli(k[4], 0.5, (3,))
    for axis in range(3):
        x = jnp.where(flips[axis], jnp.flip(x, axis), x)
        y = jnp.where(flips[axis], jnp.flip(y, axis), y)
    a = jax.random.uniform(k[5], (2,), minval=0.9, maxval=1.1)
    b = jax.random.uniform(k[6], (2,), minval=-0.1, maxval=0.1)
    x = jnp.where(x != 0, x * a + b, 0.0)
    return x, y


def _synthetic_sample(key, bank, cfg: SegConfig):


    k1, k2 = jax.random.split(key)
    i = jax.random.randint(k1, (), 0, bank["density"].shape[0])
    spacing = float(cfg.bank.generator.net_spacing)
    return render_sample(k2, bank["density"][i], bank["wm"][i], bank["gm"][i], bank["brain"][i], spacing, cfg.render)


def make_batch(key, bank, real, case_weights, p_real, cfg: SegConfig):
    """(members, batch, P, P, P, 2) inputs and (..., 3) targets: each sample real with
    probability p_real, else synthetic (both are drawn; one is kept)."""

    tr = cfg.train

    def one(k):
        k1, k2, k3 = jax.random.split(k, 3)
        xs, ys = _synthetic_sample(k1, bank, cfg)
        xr, yr = _real_sample(k2, real, case_weights, cfg)
        use = jax.random.bernoulli(k3, p_real)
        return jnp.where(use, xr, xs), jnp.where(use, yr, ys)

    keys = jax.random.split(key, (tr.members, tr.batch_size))
    return jax.vmap(jax.vmap(one))(keys)


# --------------------------------------------------------------------------- loss, step


def region_loss(logits, y, dice_weight: float = 1.0):
    """Binary cross-entropy + soft Dice (over batch and voxels, per region) of region
    logits against {0,1} or soft targets; both (b, X, Y, Z, 3)."""

    bce = optax.sigmoid_binary_cross_entropy(logits, y).mean()
    p = jax.nn.sigmoid(logits)
    axes = tuple(range(y.ndim - 1))
    dice = (2 * (p * y).sum(axes) + 1.0) / (p.sum(axes) + y.sum(axes) + 1.0)
    return bce + dice_weight * (1.0 - dice.mean())


def _pool_targets(y, factor: int):
    b, n0, n1, n2, c = y.shape
    f = factor
    return y.reshape(b, n0 // f, f, n1 // f, f, n2 // f, f, c).mean(axis=(2, 4, 6))


def make_train_step(graphdef, cfg: SegConfig):
    """jit-compiled (params, opt_state, data, key, lr, case_weights, p_real) ->
    (params, opt_state, loss): draws the batch on the device, AdamW with a given lr."""

    tx = _optimizer(cfg)
    tr = cfg.train

    def loss_fn(params, x, y):
        model = nnx.merge(graphdef, params)
        if cfg.model.deep_supervision:
            outs = nnx.vmap(lambda m, xx: m.deep_logits(xx), in_axes=(0, 0), out_axes=0)(model, x)
        else:
            outs = [nnx.vmap(lambda m, xx: m(xx), in_axes=(0, 0), out_axes=0)(model, x)]
        total, weights = 0.0, 0.0
        for level, logits in enumerate(outs):
            w = 0.5**level
            target = y if level == 0 else jax.vmap(lambda t: _pool_targets(t, 2**level))(y)
            per_member = jax.vmap(lambda lg, t: region_loss(lg, t, tr.dice_weight))(logits, target)
            total, weights = total + w * per_member.sum(), weights + w
        return total / weights

    @jax.jit
    def step(params, opt_state, data, key, lr, case_weights, p_real):
        x, y = make_batch(key, data["bank"], data["real"], case_weights, p_real, cfg)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, loss / tr.members

    return step


def _optimizer(cfg: SegConfig):
    """AdamW without its learning rate (the step scales the updates by a traced lr)."""

    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(),
                       optax.add_decayed_weights(cfg.train.weight_decay))


def _lr(peak: float, warmup: int, progress: float, step: int) -> float:
    """Linear warm-up over `warmup` steps, times a cosine to 2 % of the peak over progress."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return peak * warm * learning_rate_factor(step, progress, warmup_steps=0)


# --------------------------------------------------------------------------- checkpoints


def train_stage(
    name: str,
    workdir: Path,
    step_fn,
    params,
    data: dict,
    cfg: SegConfig,
    *,
    steps: int,
    learning_rate: float,
    warmup: int,
    case_weights: np.ndarray,
    p_real: float,
    deadline: float | None,
    seed: int,
    progress: bool = True,
):
    """Train `params` for `steps` (or until the wall-clock `deadline`), resuming from and
    saving to orbax checkpoints in `workdir/checkpoints/<name>`.

    A stage that has finished all its steps before is only restored. Returns
    (params, info): info has steps_done, complete (all steps done), seconds, final_loss.
    """


    tr = cfg.train
    tx = _optimizer(cfg)
    params = jax.tree.map(jnp.array, params)  # a private copy: stages never share buffers
    opt_state = tx.init(params)
    manager = TrainCheckpoints(workdir / "checkpoints" / name, tr.keep_checkpoints)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        params, opt_state = manager.restore(latest, params, opt_state)
        start = int(latest)
        _log(f"[{name}] resumed at step {start}", progress and start < steps)
    t0 = time.perf_counter()
    allotted = None if deadline is None else max(deadline - t0, 1e-3)
    cw = jnp.asarray(case_weights, jnp.float32)
    losses = []
    base_key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) % (2**31))
    for step in range(start, steps):
        now = time.perf_counter()
        if deadline is not None and now >= deadline and step > start:
            break
        progress_frac = max(step / steps, 0.0 if allotted is None else (now - t0) / allotted)
        lr = _lr(learning_rate, warmup, progress_frac, step)
        params, opt_state, loss = step_fn(params, opt_state, data, jax.random.fold_in(base_key, step),
                                          jnp.float32(lr), cw, jnp.float32(p_real))
        losses.append(float(loss))
        done = step + 1
        if done % tr.log_every == 0 or done == steps:
            rate = (done - start) / (time.perf_counter() - t0)
            _log(f"[{name}] step {done}/{steps} loss {np.mean(losses[-tr.log_every:]):.4f} "
                 f"lr {lr:.2e} ({rate:.2f} steps/s)", progress)
        if done % tr.checkpoint_every == 0:
            manager.save(done, params, opt_state)
    done = start + len(losses)
    if losses and done % tr.checkpoint_every:
        manager.save(done, params, opt_state)
    manager.close()
    info = {"steps_done": done, "complete": done >= steps, "seconds": time.perf_counter() - t0,
            "final_loss": float(np.mean(losses[-tr.log_every:])) if losses else None}
    if losses and done < steps:
        _log(f"[{name}] time budget reached at step {done}/{steps}: checkpointed", progress)
    return params, info


# --------------------------------------------------------------------------- evaluation


def evaluate_case(weights, case) -> dict[str, Any]:
    """Dice and HD95 (mm) per region of the ensemble's segmentation of a real case
    (sliding window, original resolution, no TTA, the post-processing of
    `rtjax.seg.infer.segment_arrays`), plus volumes (mL)."""

    t0 = time.perf_counter()
    probs, _ = predict_regions(weights, case.x, case.spacing)
    pred = probs_to_case_masks(probs, case.brain, weights.config.infer.keep_fraction)
    metrics = region_metrics(pred, case.masks, case.spacing)
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    out = {"case": case.name, "seconds": time.perf_counter() - t0}
    for region, values in metrics.items():
        out[f"dice_{region}"] = values["dice"]
        out[f"hd95_{region}"] = values["hausdorff95"]
    for region, pm, rm in (("WT", pred.whole, case.masks.whole), ("TC", pred.core, case.masks.core),
                           ("ET", pred.enhancing, case.masks.enhancing)):
        out[f"volume_ml_{region}"] = float(pm.sum()) * voxel_ml
        out[f"reference_ml_{region}"] = float(rm.sum()) * voxel_ml
    return out


def summarise(rows: list[dict]) -> dict[str, float]:
    """Means (and medians) of the per-case Dice and HD95 columns (finite values only)."""
    out = {}
    for key in rows[0] if rows else []:
        if key.startswith(("dice_", "hd95_")):
            vals = np.asarray([r[key] for r in rows], float)
            vals = vals[np.isfinite(vals)]
            out[f"mean_{key}"] = float(vals.mean()) if len(vals) else float("nan")
            out[f"median_{key}"] = float(np.median(vals)) if len(vals) else float("nan")
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table of the per-case leave-one-out metrics."""
    head = "| case | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | " + " | ".join(f"{r[f'dice_{g}']:.3f}" for g in ("WT", "TC", "ET"))
                     + " | " + " | ".join(f"{r[f'hd95_{g}']:.1f}" for g in ("WT", "TC", "ET")) + " |")
    if rows:
        s = summarise(rows)
        lines.append("| **mean** | " + " | ".join(f"{s[f'mean_dice_{g}']:.3f}" for g in ("WT", "TC", "ET"))
                     + " | " + " | ".join(f"{s[f'mean_hd95_{g}']:.1f}" for g in ("WT", "TC", "ET")) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- weights


def export_weights(params, config: SegConfig, metrics: dict, out_dir) -> Path:
    """Write a weights folder: `params/` (orbax), `config.yaml`, `metrics.json` and a
    generated `MODEL_CARD.md`; replaces an existing folder once complete."""

    return save_weights(out_dir, params, config_to_dict(config), metrics,
                        model_card=model_card(config, metrics))


def model_card(config: SegConfig, metrics: dict) -> str:
    """A generated model card: what was trained, how, and the leave-one-out table."""
    m, tr = config.model, config.train
    rows = metrics.get("loo", [])
    timing = metrics.get("timing_seconds", {})
    return f"""# Segmentation model `{config.version}` (rtjax.seg)

**What it is.** An ensemble of {tr.members} 3-D U-Net(s) (`rtjax.seg.model.UNet`, widths
{list(m.widths)}, {m.norm} norm, {metrics.get('parameters_per_member', '?')} parameters each)
reading T1c + FLAIR z-scored in the brain and predicting the nested regions WT, TC, ET
(sigmoids), turned into necrosis / enhancing / edema labels. Working resolution
{config.render.spacing:g} mm, sliding windows of {config.infer.patch}^3 voxels.

**Training.** Device: {metrics.get('device', '?')}. Base model on synthetic patients
({metrics.get('bank_tumours', '?')} FK tumours grown in the MNI152 atlas by
`growth.inverse`, rendered on the fly with random contrasts, bias, noise, blur,
resolution and geometry; {metrics.get('base', {}).get('steps_done', '?')} steps), then
fine-tuned on the real cases mixed with synthetic patches
({metrics.get('final', {}).get('steps_done', '?')} steps on all
{len(metrics.get('real_cases', []))} real cases: {', '.join(metrics.get('real_cases', [])) or 'none'}).
Wall time per stage (s): {json.dumps({k: round(v, 1) for k, v in timing.items()})}.

**Leave-one-out validation** (each case scored by a copy of the base model fine-tuned on
the other real cases only; Dice, HD95 in mm; original 1 mm grid):

{format_table(rows) if rows else '(no real case available)'}

**Limitations.** Trained on very few real cases; the synthetic tumours are isotropic FK
growths without mass effect; T1c + FLAIR only. The tcga reference is an algorithm fusion,
not expert labels. Retrain with `rtjax train-seg configs/seg_h100.yaml --workdir DIR` or
`scripts/device_seg.py` on an accelerator.
"""


# --------------------------------------------------------------------------- the run


def _device_data(bank: dict, real: dict) -> dict:

    keys = ("density", "wm", "gm", "brain")
    return {"bank": {k: jnp.asarray(bank[k]) for k in keys}, "real": {k: jnp.asarray(v) for k, v in real.items()}}


def train_and_evaluate(
    config: SegConfig | str | Path,
    workdir: str | Path,
    *,
    max_seconds: float | None = None,
    atlas=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the four stages and export `workdir/weights`.

    Args:
        config: a `SegConfig` or a YAML path.
        workdir: checkpoints, bank, per-case results, weights.
        max_seconds: wall-clock budget (overrides `train.max_seconds`).
        atlas: (wm, gm, spacing) for the bank (default: MNI152 from nilearn).

    Returns:
        {"weights": path, "metrics": dict (also in weights/metrics.json), "loo": rows}.
    """


    if not isinstance(config, SegConfig):
        config = load_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tr = config.train
    budget = max_seconds if max_seconds is not None else tr.max_seconds
    t_run = time.perf_counter()
    ends = None if budget is None else list(t_run + budget * np.cumsum(tr.stage_fractions))
    write_yaml(workdir / "config.yaml", {**config_to_dict(config), "run": run_metadata()})
    timing: dict[str, float] = {}

    # real cases load in a thread while the bank is simulated (file reads release the GIL)
    root = resolve_data_root(config.data.root)
    found = find_real_cases(root, config.data.sources)[: config.data.max_cases]
    pool = ThreadPoolExecutor(max_workers=2)
    loading = [pool.submit(load_real_case, *f) for f in found]

    # 1. bank
    t0 = time.perf_counter()
    bank_path = workdir / "bank.npz"
    if bank_path.exists():
        bank = load_bank(bank_path)
    else:
        left = None if ends is None else ends[0] - time.perf_counter()
        bank = build_bank(config.bank.generator, config.bank.cases, seed=config.bank.seed, atlas=atlas,
                          sim_batch=config.bank.sim_batch, max_seconds=left, progress=progress)
        save_bank(bank, bank_path)
    timing["bank"] = time.perf_counter() - t0
    _log(f"[bank] {len(bank['density'])} tumours ready ({timing['bank']:.0f} s)", progress)

    cases = [f.result() for f in loading]
    pool.shutdown()
    names = [c.name for c in cases]
    _log(f"[data] real cases: {names or 'none'} (root {root})", progress)
    data = _device_data(bank, prepare_real(cases, config, tr.seed))
    n_real = max(len(cases), 1)

    model = create_ensemble(config.model, tr.members, seed=tr.seed)
    graphdef, params0 = nnx.split(model)
    step_fn = make_train_step(graphdef, config)
    common = dict(data=data, cfg=config, seed=tr.seed, progress=progress)

    # 2. base
    t0 = time.perf_counter()
    all_w = np.ones(n_real, np.float32)
    base, base_info = train_stage(
        "base", workdir, step_fn, params0, steps=tr.base_steps, learning_rate=tr.learning_rate,
        warmup=tr.warmup_steps, case_weights=all_w, p_real=tr.base_real_fraction if cases else 0.0,
        deadline=None if ends is None else ends[1], **common)
    timing["base"] = time.perf_counter() - t0

    # 3. leave-one-out
    t0 = time.perf_counter()
    rows = []
    loo_dir = workdir / "loo"
    for k, case in enumerate(cases):
        path = loo_dir / f"{case.name.replace('/', '__')}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        deadline = None
        if ends is not None and time.perf_counter() >= ends[2]:
            _log(f"[loo] time budget spent: {case.name} and later cases not scored", progress)
            break
        if ends is not None:
            deadline = time.perf_counter() + max(ends[2] - time.perf_counter(), 0.0) / (len(cases) - k)
            deadline -= min(0.25 * (deadline - time.perf_counter()), 30.0)  # leave time to score
        weights_k = np.ones(n_real, np.float32)
        weights_k[k] = 0.0
        others = weights_k.sum() > 0
        tuned, info = train_stage(
            f"loo_{k}", workdir, step_fn, base, steps=tr.finetune_steps,
            learning_rate=tr.finetune_learning_rate, warmup=1,
            case_weights=weights_k if others else all_w, p_real=tr.real_fraction if others else 0.0,
            deadline=deadline, **common)
        row = evaluate_case(SegWeights(graphdef=graphdef, params=tuned, config=config, path=None), case)
        row["finetune_steps"] = info["steps_done"]
        write_json_atomic(path, row)
        rows.append(row)
        _log(f"[loo] {case.name}: Dice WT {row['dice_WT']:.3f} TC {row['dice_TC']:.3f} "
             f"ET {row['dice_ET']:.3f}; HD95 WT {row['hd95_WT']:.1f} TC {row['hd95_TC']:.1f} "
             f"ET {row['hd95_ET']:.1f} mm ({info['steps_done']} steps)", progress)
    timing["loo"] = time.perf_counter() - t0

    # 4. final
    t0 = time.perf_counter()
    if cases and (ends is None or time.perf_counter() < ends[3]):
        final, final_info = train_stage(
            "final", workdir, step_fn, base, steps=tr.final_steps,
            learning_rate=tr.finetune_learning_rate, warmup=1, case_weights=all_w,
            p_real=tr.real_fraction, deadline=None if ends is None else ends[3], **common)
    else:
        final, final_info = base, {"steps_done": 0, "complete": not cases}
    timing["final"] = time.perf_counter() - t0

    metrics = {
        "version": config.version,
        "members": tr.members,
        "parameters_per_member": count_params(model) // tr.members,
        "bank_tumours": int(len(bank["density"])),
        "real_cases": names,
        "base": base_info,
        "final": final_info,
        "loo": rows,
        "loo_summary": summarise(rows),
        "timing_seconds": timing,
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        **run_metadata(),
    }
    weights = export_weights(final, config, metrics, workdir / "weights")
    if rows:
        _log("[loo] leave-one-out table\n" + format_table(rows), progress)
    _log(f"[done] weights in {weights} ({time.perf_counter() - t_run:.0f} s)", progress)
    return {"weights": weights, "metrics": metrics, "loo": rows}
