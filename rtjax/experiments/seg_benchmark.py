"""Segmentation benchmark: training throughput and inference time per case, side by side.

`training_rows()` times one Adam step (float32, jit, after compilation; BCE on random data,
so every row does the same work per sample) of the 2.5-D recipe and of the 3-D recipe it
replaced, and the whole step `rtjax train-seg` runs for the shipped weights (augmentation,
BCE + soft Dice: what a training run gets); `inference_rows(weights)` times `segment_arrays` on a 240 x 240 x 155 case at 1 mm
(no TTA) for weights folders. `benchmark_table()` prints both as markdown with ratios.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rtjax.seg.infer import DEFAULT_WEIGHTS, load_weights, segment_arrays
from rtjax.seg.model import UNet, UNetConfig
from rtjax.seg.slice_train import SliceSegConfig, load_slice_config, make_train_step

__all__ = ["TRAIN_RECIPES", "train_step_seconds", "trained_step_seconds", "training_rows", "inference_rows", "benchmark_table"]

#: (name, U-Net, input shape of one step (batch, spatial..., channels)).
TRAIN_RECIPES = (
    ("2.5-D 8-128, 16 x 96^2 (chosen)",
     UNetConfig(widths=(8, 16, 32, 64, 128), norm="group", in_channels=10, spatial_dims=2), (16, 96, 96, 10)),
    ("2.5-D 16-256, 16 x 96^2",
     UNetConfig(widths=(16, 32, 64, 128, 256), norm="group", in_channels=10, spatial_dims=2), (16, 96, 96, 10)),
    ("3-D 8-128, 2 x 64^3 (previous, h100-0.1)",
     UNetConfig(widths=(8, 16, 32, 64, 128), norm="instance"), (2, 64, 64, 64, 2)),
)


def _seconds_per_step(advance, state, repeats: int) -> float:
    """Mean seconds of `state = advance(state, i)` over `repeats` calls after one that
    compiles (`i`: the call's index, for a fresh random key)."""
    state = advance(state, 0)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(repeats):
        state = advance(state, i + 1)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / repeats


def train_step_seconds(cfg: UNetConfig, shape: tuple[int, ...], repeats: int = 3) -> float:
    """Seconds of one jitted Adam step of `UNet(cfg)` on a batch of `shape` (after compiling)."""
    graphdef, params = nnx.split(UNet(cfg, rngs=nnx.Rngs(0)))
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, x, y):
        loss = lambda p: optax.sigmoid_binary_cross_entropy(nnx.merge(graphdef, p)(x), y).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    x = jax.random.normal(jax.random.key(0), shape)
    y = jnp.zeros(shape[:-1] + (3,))
    return _seconds_per_step(lambda state, i: step(*state, x, y)[:2], (params, tx.init(params)), repeats)


def trained_step_seconds(cfg: SliceSegConfig, repeats: int = 3) -> float:
    """Seconds of one step of `cfg`'s training recipe as `rtjax train-seg` runs it
    (`make_train_step`: augmentation, BCE + soft Dice, Adam; after compiling) on a batch of
    random crops."""
    step, tx = make_train_step(cfg)
    params = nnx.split(UNet(cfg.model.unet, rngs=nnx.Rngs(0)))[1]
    t, channels = cfg.train, cfg.model.unet.in_channels
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (t.batch, t.crop, t.crop, channels))
    y = (jax.random.uniform(ky, (t.batch, t.crop, t.crop, 3)) < 0.2).astype(jnp.float32)
    return _seconds_per_step(lambda state, i: step(*state, jax.random.key(1 + i), x, y)[:2],
                             (params, tx.init(params)), repeats)


def training_rows(repeats: int = 3, trained_config=None) -> list[dict]:
    """One row per `TRAIN_RECIPES` entry (seconds per step, samples per second), then the
    whole training step of `trained_config` (a 2.5-D config file; default: the shipped
    weights' `config.yaml`)."""
    rows = []
    for name, cfg, shape in TRAIN_RECIPES:
        seconds = train_step_seconds(cfg, shape, repeats)
        rows.append({"recipe": name, "s_per_step": seconds, "samples_per_s": shape[0] / seconds})
    cfg = load_slice_config(trained_config or DEFAULT_WEIGHTS / "config.yaml")
    seconds = trained_step_seconds(cfg, repeats)
    t = cfg.train
    rows.append({"recipe": f"{cfg.version} as trained (blur {t.blur:g}, contrast {t.contrast:g}, "
                           f"BCE + soft Dice; {t.batch} x {t.crop}^2)",
                 "s_per_step": seconds, "samples_per_s": t.batch / seconds})
    return rows


def _case(seed: int = 0):
    """A 240 x 240 x 155 brain-shaped pair of raw images (the timing does not depend on content)."""
    g = np.indices((240, 240, 155), dtype=np.float32)
    brain = ((g[0] - 120) / 70) ** 2 + ((g[1] - 120) / 85) ** 2 + ((g[2] - 77) / 60) ** 2 < 1
    rng = np.random.default_rng(seed)
    return [np.where(brain, 300 + 30 * rng.standard_normal(brain.shape), 0).astype(np.float32) for _ in range(2)]


def inference_rows(weights=(None,), repeats: int = 2) -> list[dict]:
    """Per weights folder (None: the shipped one): first call (compilation included) and
    steady seconds of `segment_arrays` on a 240 x 240 x 155 case at 1 mm, no TTA."""
    t1c, flair = _case()
    rows = []
    for path in weights:
        w = load_weights(path)
        start = time.perf_counter()
        segment_arrays(t1c, flair, (1.0, 1.0, 1.0), weights=w)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(repeats):
            segment_arrays(t1c, flair, (1.0, 1.0, 1.0), weights=w)
        rows.append({"weights": f"{path or 'shipped'} ({w.version})", "first_s": first,
                     "steady_s": (time.perf_counter() - start) / repeats})
    return rows


def benchmark_table(weights=(None,), repeats: int = 3) -> str:
    """Both tables as markdown; ratios against the first row."""
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    train = training_rows(repeats)
    lines = [f"device: {device}", "", "| training recipe | s/step | samples/s | samples/s vs chosen |",
             "|---|---|---|---|"]
    for r in train:
        lines.append(f"| {r['recipe']} | {r['s_per_step']:.2f} | {r['samples_per_s']:.1f} "
                     f"| {r['samples_per_s'] / train[0]['samples_per_s']:.2f} |")
    infer = inference_rows(weights)
    lines += ["", "| weights | first call (s) | steady (s) | steady vs first row |", "|---|---|---|---|"]
    for r in infer:
        lines.append(f"| {r['weights']} | {r['first_s']:.1f} | {r['steady_s']:.1f} "
                     f"| {r['steady_s'] / infer[0]['steady_s']:.2f} |")
    return "\n".join(lines)
