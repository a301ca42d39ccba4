"""Regenerate tests/data/seg_reference.npz: the shipped segmentation weights' labels (BraTS
2021) and region probabilities (float16) of the deterministic synthetic phantom
(`rtjax.seg.synth.phantom_case()` rendered by `render_case(..., seed=0)`). The phantom is a
small 64 mm head the network finds little tumour in, so the probabilities are what pin the
weights and the inference down. Run after replacing rtjax/weights/seg:

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
    probs = weights.probabilities(t1c, flair, case["spacing"])[0]
    out = Path(__file__).with_name("seg_reference.npz")
    np.savez_compressed(out, labels=labels, probs=probs.astype(np.float16), version=np.array(weights.version))
    print(f"wrote {out}: weights {weights.version}, voxels per label "
          f"{dict(zip(*np.unique(labels, return_counts=True)))}, highest probability per region "
          f"{probs.max((0, 1, 2)).round(3).tolist()}")
