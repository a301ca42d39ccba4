"""A quick-look figure of a segmentation: T1c and FLAIR with the labels overlaid, on the
axial, coronal and sagittal slices through the tumour's centre (not part of the pipeline's
report; for checking a `rtjax segment` output by eye).

    python -m rtjax.seg.figure CASE_DIR OUT_DIR/segmentation.nii.gz figure.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rtjax.io import load_case, load_tumour_masks
from rtjax.plotting import headless_pyplot

__all__ = ["segmentation_figure"]


def segmentation_figure(case_dir, seg_path, out_png, *, labels: str = "brats2021") -> Path:
    """Write a 2x3 PNG (T1c / FLAIR rows; axial, coronal, sagittal) with necrosis (blue),
    enhancing (red) and edema (green) outlines; volumes in mL in the title."""

    plt = headless_pyplot()

    case = load_case(case_dir, names=["t1c", "flair"], require=["t1c", "flair"])
    masks, _ = load_tumour_masks(seg_path, labels, require_tumour=False)
    whole = masks.whole
    centre = np.argwhere(whole).mean(0).round().astype(int) if whole.any() else np.array(whole.shape) // 2
    ml = case.images["t1c"].voxel_volume_ml
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, name in enumerate(("t1c", "flair")):
        image = case.images[name].data
        for col, axis in enumerate((2, 1, 0)):
            take = lambda a: np.take(a, centre[axis], axis=axis).T  # noqa: E731
            ax = axes[row, col]
            ax.imshow(take(image), cmap="gray", origin="lower")
            for mask, colour in ((masks.necrosis, "tab:blue"), (masks.enhancing, "tab:red"), (masks.edema, "tab:green")):
                if take(mask).any():
                    ax.contour(take(mask).astype(float), levels=[0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"{name} {'axial coronal sagittal'.split()[col]}")
            ax.axis("off")
    fig.suptitle(f"{Path(case_dir).name}: necrosis {masks.necrosis.sum() * ml:.1f} mL (blue), enhancing "
                 f"{masks.enhancing.sum() * ml:.1f} mL (red), edema {masks.edema.sum() * ml:.1f} mL (green)")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    print(segmentation_figure(*sys.argv[1:4], **({"labels": sys.argv[4]} if len(sys.argv) == 5 else {})))
