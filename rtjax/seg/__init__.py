"""Tumour segmentation from T1c + FLAIR: a 3-D U-Net ensemble in Flax NNX.

* `rtjax.seg.model`: the U-Net, input normalisation, region outputs -> tumour masks.
* `rtjax.seg.synth`: synthetic training patients (FK tumour bank + pure-JAX MR renderer),
  `render_case` for whole synthetic cases.
* `rtjax.seg.data`: the real labelled cases (BRATS 2015, TCGA).
* `rtjax.seg.train`: `train_and_evaluate(config, workdir)` (leave-one-out validation).
* `rtjax.seg.infer`: sliding-window inference, `segment_case`, shipped weights.
* `rtjax.seg.device`: the one-job accelerator run behind `scripts/device_seg.py`.
"""

from rtjax.seg.infer import (
    DEFAULT_WEIGHTS,
    SegWeights,
    load_weights,
    segment_arrays,
    segment_case,
    write_segmentation,
)
from rtjax.seg.model import REGIONS, UNet, UNetConfig, normalise
from rtjax.seg.synth import render_case

__all__ = [
    "DEFAULT_WEIGHTS",
    "REGIONS",
    "SegWeights",
    "UNet",
    "UNetConfig",
    "load_weights",
    "normalise",
    "render_case",
    "segment_arrays",
    "segment_case",
    "write_segmentation",
]
