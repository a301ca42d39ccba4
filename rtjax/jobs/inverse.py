"""The one time-budgeted accelerator job of the inverse model (`scripts/device_inverse.py`):
training, data-generation throughput and the fit's time per case on the device."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from growth.fit import FitConfig
from rtjax.atlas import atlas_arrays
from rtjax.config import to_dict
from rtjax.experiments.fit_evaluation import LEVELS, fit_held_out_case, format_fit_table, held_out_cases
from rtjax.inverse.config import InverseConfig, load_config, with_budget
from rtjax.inverse.dataset import generation_throughput
from rtjax.inverse.train import train_and_evaluate
from rtjax.inverse.weights import load_weights
from rtjax.ml import tar_folder
from rtjax.provenance import run_metadata, write_json_atomic

__all__ = ["device_job", "run_device_job"]

_FIT_TIMING_SEED = 424_242  # held-out cases of the device job's fit timing


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
    3. Network + refinement time per case (`rtjax.experiments.fit_evaluation.fit_held_out_case`) on
       held-out simulated cases of the new weights; a case starts only when 1.5 times the
       last one's time is left.
    `out_dir/inverse_metrics.json` is rewritten after every stage. `started` is the
    `time.perf_counter()` at which the budget began (default: now).
    """
    started = time.perf_counter() if started is None else started
    deadline = started + budget_s
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "inverse_metrics.json"
    train_budget = budget_s * (1.0 - fit_share) - 5.0 - (time.perf_counter() - started)
    config = with_budget(config, train_budget)
    report: dict[str, Any] = {
        "budget_s": budget_s, "train_budget_s": train_budget, "config": to_dict(config),
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})", **run_metadata(),
    }
    print(f"[job] {report['device']}: budget {budget_s:.0f} s, training {train_budget:.0f} s",
          flush=True)

    def stage(name: str, value) -> None:
        report[name] = value
        report["elapsed_s"] = time.perf_counter() - started
        write_json_atomic(metrics_path, report)

    def exported(path) -> None:  # after training, and again after the evaluation
        tar_folder(path, out_dir / "inverse_weights.tar.gz", "inverse")
        stage("training", json.loads((Path(path) / "metrics.json").read_text()))

    atlas = atlas_arrays()
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


def _hard_stop():
    """The watchdog at the budget: leave at once, even inside a running JAX computation
    (the outputs written so far are complete files, each written atomically)."""
    print("[job] hard cap: the time budget is spent; the outputs written so far stay", flush=True)
    os._exit(3)


def run_device_job(config_path, budget_s: float, out_dir, *, workdir=None, fit_cases: int = 8,
                   fit_iterations: int | None = None, started: float | None = None) -> dict:
    """`device_job` on the YAML config `config_path` under a watchdog that ends the process
    (exit code 3) at `budget_s` after `started` whatever it is doing; `workdir` defaults
    to a fresh temporary folder."""
    started = time.perf_counter() if started is None else started
    config = load_config(config_path)
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="inverse_job_"))
    watchdog = threading.Timer(budget_s - (time.perf_counter() - started), _hard_stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        return device_job(config, budget_s, out_dir, workdir=workdir, fit_cases=fit_cases,
                          fit_iterations=fit_iterations, started=started)
    finally:
        watchdog.cancel()
