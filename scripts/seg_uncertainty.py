"""Segmentation uncertainty against Dice on the labelled cases (and the BraTS 2023 case,
unlabelled): the evidence for the fit-quality gate's uncertainty threshold; see
rtjax.experiments.seg_uncertainty.

    python scripts/seg_uncertainty.py [--data ../shared/data] [--weights DIR] [--held-out-weights RUN/fold_weights]
"""

import argparse
from pathlib import Path

from rtjax.data import data_root
from rtjax.experiments.seg_uncertainty import format_uncertainty_table, uncertainty_rows

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data root (default RTJAX_DATA or ../shared/data)")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder (default: the shipped weights)")
    parser.add_argument("--held-out-weights", type=Path, default=None,
                        help="a fold ensemble (a training run's fold_weights/): each labelled case also segmented by "
                             "its own fold's models, which never saw it")
    args = parser.parse_args()
    root = args.data or data_root()
    brats23 = root / "brats2023" / "BraTS-GLI-00001-000"
    extra = {"brats2023/BraTS-GLI-00001-000 (no labels)":
             (brats23 / "BraTS-GLI-00001-000-t1c.nii.gz", brats23 / "BraTS-GLI-00001-000-t2f.nii.gz")}
    rows = uncertainty_rows(root, weights=args.weights, held_out_weights=args.held_out_weights,
                            unlabelled=extra if brats23.is_dir() else None)
    print(format_uncertainty_table(rows))
