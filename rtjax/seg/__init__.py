"""Tumour segmentation from T1c + FLAIR: U-Net ensembles in Flax NNX (the shipped one 2.5-D).

* `rtjax.seg.slices`: the 2.5-D model (2-D U-Nets on axial, coronal and sagittal slices).
* `rtjax.seg.slice_train`: its k-fold training on the real labelled cases (`rtjax.seg.cases`).
* `rtjax.seg.postprocessing`: its post-processing candidates, chosen by held-out Dice.
* `rtjax.seg.model`: the U-Net, input normalisation, region outputs -> tumour masks.
* `rtjax.seg.synth`: synthetic training patients (FK tumour bank + pure-JAX MR renderer),
  `render_case` for whole synthetic cases.
* `rtjax.seg.data`: the real labelled cases (BRATS 2015, TCGA).
* `rtjax.seg.train`: the 3-D model's `train_and_evaluate(config, workdir)` (leave-one-out).
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
