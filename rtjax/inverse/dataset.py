"""Simulated training data of the inverse model: npz shards written by the generator.

`write_dataset` runs `growth.inverse.iterate_simulations` into shards
`shard_XXXXX.npz` (each from its own stream, so an interrupted run resumes at the first
missing shard), `load_dataset` concatenates them, `generation_throughput` times one
vmapped generator batch. Tissue is stored as uint8 (1/255), density as float16.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from growth.inverse import GeneratorConfig, draw_cases, iterate_simulations, simulate_cases
from rtjax.atlas import atlas_arrays
from rtjax.config import to_dict
from rtjax.provenance import atomic_write, run_metadata, write_json_atomic

__all__ = ["SHARD_FIELDS", "write_dataset", "load_dataset", "dataset_complete", "generation_throughput"]

#: Fields stored per case in a dataset shard, and their on-disk dtypes.
SHARD_FIELDS = {
    "density": np.float16, "wm": np.uint8, "gm": np.uint8,
    "origin_rel_mm": np.float32, "com_box_mm": np.float32,
    "origin_atlas_mm": np.float32, "transform": np.float32,
    "dw": np.float32, "rho": np.float32, "t_days": np.float32,
    "sqrt_dw_t": np.float32, "sqrt_rho_t": np.float32, "u_t1": np.float32, "u_fl": np.float32,
}


def _encode_case_arrays(batch: dict) -> dict:
    out = {}
    for key, dtype in SHARD_FIELDS.items():
        value = np.asarray(batch[key])
        if dtype == np.uint8:
            value = np.round(np.clip(value, 0.0, 1.0) * 255.0)
        out[key] = value.astype(dtype)
    return out


def _shard_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def _write_shard(gen, atlas, path: Path, want: int, seed: int, sim_batch: int) -> None:
    """Simulate `want` accepted cases from the stream `seed` into `path` (atomically)."""
    atlas_wm, atlas_gm, atlas_spacing = atlas
    stream = iterate_simulations(gen, atlas_wm, atlas_gm, atlas_spacing, seed=seed, batch_size=sim_batch)
    parts, have = [], 0
    while have < want:
        batch = next(stream)
        parts.append(_encode_case_arrays(batch))
        have += len(batch["dw"])
    shard = {key: np.concatenate([p[key] for p in parts])[:want] for key in SHARD_FIELDS}
    atomic_write(path, lambda tmp: np.savez(tmp, **shard), suffix=".npz")


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
    time. With a `deadline` (a `time.perf_counter()` value) no new shard is started after
    it, once one exists: the dataset is then partial and a later call completes it.
    `atlas`: (wm, gm, spacing) arrays (default `rtjax.atlas.atlas_arrays()`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "dataset.json"
    gen_dict = to_dict(gen)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("generator") != gen_dict or meta.get("seed") != seed:
            raise ValueError(f"{out_dir} holds a dataset from another generator config or seed")
    atlas = atlas if atlas is not None else atlas_arrays()
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
        _write_shard(gen, atlas, path, want, _shard_seed(seed, k), sim_batch)
        generated += want
        if progress:
            print(f"[data] {out_dir.name}: {min((k + 1) * shard_size, n_cases)}/{n_cases} cases "
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
            parts.append({k: data[k] for k in SHARD_FIELDS})
    data = {k: np.concatenate([p[k] for p in parts]) for k in SHARD_FIELDS}
    if n_cases is not None:
        data = {k: v[:n_cases] for k, v in data.items()}
    return data


def dataset_complete(path: Path, n_cases: int) -> bool:
    """Whether the dataset folder `path` holds all `n_cases` cases."""
    meta = Path(path) / "dataset.json"
    if not meta.exists():
        return False
    data = json.loads(meta.read_text())
    return data.get("n_cases") == n_cases and data.get("cases", n_cases) >= n_cases


def generation_throughput(gen: GeneratorConfig, atlas, batch: int, *, seed: int = 7) -> dict:
    """Time one vmapped generator batch of `batch` simulations (compiled first, then timed).

    Returns simulations/s, accepted/s, the acceptance rate, the batch's explicit steps
    (its slowest member's) and the effective voxel-steps/s (batch x steps x box voxels).
    """
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
