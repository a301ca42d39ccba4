"""One accelerator job: train, validate leave-one-out, package the weights, time inference.

`device_run(config, data, out, budget_s)` is what `scripts/device_seg.py` runs: it calls
`rtjax.seg.train.train_and_evaluate` with the budget minus a reserve, then writes into
`out`: `seg_weights.tar.gz` (the weights folder in the shipped layout, top folder `seg/`),
`seg_metrics.json` (per-case leave-one-out table, summary, stage timings, device) and the
time of one sliding-window inference of a 240x240x155 case on that device.
"""

from __future__ import annotations

import dataclasses
import tarfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from rtjax.provenance import atomic_write, write_json_atomic
from rtjax.seg.config import SegConfig, load_config
from rtjax.seg.infer import load_weights, predict_regions, weights_from_model
from rtjax.seg.model import count_params, create_ensemble
from rtjax.seg.train import train_and_evaluate

__all__ = ["BRATS_SHAPE", "device_run", "time_inference", "benchmark_table"]

#: The BraTS grid (1 mm voxels).
BRATS_SHAPE = (240, 240, 155)


def time_inference(weights, x=None, spacing=(1.0, 1.0, 1.0), *, repeats: int = 1, deadline: float | None = None,
                   tta: bool = False):
    """Seconds of `predict_regions` on a (240, 240, 155) case, without TTA: the first call
    (compilation included) and the best of `repeats` later calls (skipped past `deadline`).
    `x`: a normalised (X, Y, Z, 2) case; default a smooth random one."""

    if x is None:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(*BRATS_SHAPE, 2)).astype(np.float32)
    t0 = time.perf_counter()
    predict_regions(weights, x, spacing, uncertainty=tta, tta=tta)
    first = time.perf_counter() - t0
    later = []
    for _ in range(repeats):
        if deadline is not None and time.perf_counter() + 1.5 * (later[-1] if later else first) > deadline:
            break
        t0 = time.perf_counter()
        predict_regions(weights, x, spacing, uncertainty=tta, tta=tta)
        later.append(time.perf_counter() - t0)
    return {"shape": list(x.shape[:3]), "first_call_s": first,
            "steady_s": min(later) if later else None, "repeats": len(later)}


def device_run(config, data: str | Path | None, out: str | Path, budget_s: float, *,
               workdir: str | Path | None = None, progress: bool = True) -> dict:
    """Train within `budget_s` seconds of wall time (everything included) and write the
    results into `out` (see the module docstring). Returns the seg_metrics.json content."""


    t_start = time.perf_counter()
    end = t_start + float(budget_s)
    if not isinstance(config, SegConfig):
        config = load_config(config)
    if data is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=str(data)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir) if workdir else out.parent / f"{out.name}_work"
    reserve = max(20.0, 0.1 * budget_s)  # packaging and the inference timing
    print(f"[device] {jax.default_backend()} ({jax.devices()[0].device_kind}); budget {budget_s:.0f} s, "
          f"reserve {reserve:.0f} s; workdir {workdir}", flush=True)
    result = train_and_evaluate(config, workdir, max_seconds=max(end - reserve - time.perf_counter(), 1.0),
                                progress=progress)

    def write_tar(tmp):
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(result["weights"], arcname="seg")

    tar_path = atomic_write(out / "seg_weights.tar.gz", write_tar, suffix=".tar.gz")
    keys = ("loo", "loo_summary", "timing_seconds", "device", "version", "parameters_per_member",
            "members", "bank_tumours", "base", "final")
    report = {**{k: result["metrics"][k] for k in keys}, "budget_s": budget_s}
    write_json_atomic(out / "seg_metrics.json", report)
    # the exported folder is loaded back: this also checks that the shipped layout restores
    weights = load_weights(result["weights"])
    if end - time.perf_counter() > 8.0:
        try:
            report["inference_240x240x155"] = time_inference(weights, repeats=2, deadline=end - 2.0)
        except Exception as err:  # noqa: BLE001 - the weights are already written: report, do not fail
            report["inference_240x240x155"] = {"error": repr(err)}
    else:
        report["inference_240x240x155"] = {"skipped": "no time left in the budget"}
    report["total_seconds"] = time.perf_counter() - t_start
    try:
        stats = jax.devices()[0].memory_stats() or {}
        report["peak_device_memory_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    write_json_atomic(out / "seg_metrics.json", report)
    print(f"[device] inference 240x240x155: {report['inference_240x240x155']}", flush=True)
    print(f"[device] wrote {tar_path} and {out / 'seg_metrics.json'} "
          f"({report['total_seconds']:.0f} s of {budget_s:.0f} s)", flush=True)
    return report


def benchmark_table(weights=None, configs=None, *, tta: bool = False, repeats: int = 1) -> str:
    """Markdown table of `time_inference` for weights folders (default: the shipped
    weights) and for untrained models of YAML configs."""


    entries = []
    for path in weights or ([] if configs else [None]):
        w = load_weights(path)
        entries.append((str(path or "shipped"), w))
    for path in configs or []:
        cfg = load_config(path)
        entries.append((f"{path} (untrained)", weights_from_model(create_ensemble(cfg.model, cfg.train.members), cfg)))
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    lines = [f"device: {device}; case 240x240x155 at 1 mm; TTA: {'flips ' if tta else 'off'}",
             "| weights | spacing (mm) | window | members | params/member | first call (s) | steady (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, w in entries:
        r = time_inference(w, repeats=repeats, tta=tta)
        cfg = w.config
        n = count_params(nnx.merge(w.graphdef, w.params)) // cfg.train.members
        steady = f"{r['steady_s']:.1f}" if r["steady_s"] is not None else "-"
        lines.append(f"| {name} | {cfg.render.spacing:g} | {cfg.infer.patch}^3 | {cfg.train.members} | {n:,} "
                     f"| {r['first_call_s']:.1f} | {steady} |")
    return "\n".join(lines)
