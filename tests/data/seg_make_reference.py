"""Regenerate tests/data/seg_reference.npz: the shipped segmentation weights' labels of the
deterministic synthetic phantom (`rtjax.seg.synth.phantom_case()` rendered by
`render_case(..., seed=0)`), BraTS 2021 labels. Run after replacing rtjax/weights/seg:

    python tests/data/seg_make_reference.py
"""

from pathlib import Path

import numpy as np

from rtjax.labels import combine_labels
from rtjax.seg import infer, synth

if __name__ == "__main__":
    case = synth.phantom_case()
    t1c, flair = synth.render_case(case["density"], case["wm"], case["gm"], case["spacing"], seed=0)
    weights = infer.load_weights()
    masks, _ = infer.segment_arrays(t1c, flair, case["spacing"], weights=weights)
    labels = combine_labels(masks, "brats2021")
    out = Path(__file__).with_name("seg_reference.npz")
    np.savez_compressed(out, labels=labels, version=np.array(weights.version))
    print(f"wrote {out}: weights {weights.version}, voxels per label "
          f"{dict(zip(*np.unique(labels, return_counts=True)))}")
