"""The real longitudinal case gliodil-patient001 through `rtjax run`, compared with the
authors' own results (Weidner et al. 2024: their 15 mm standard CTV `standardPlan`, their
model CTV `recurrencePrediction` at the same volume).

The case has a segmentation (`segm`, GliODIL labels; the 8 stray voxels of label 2 are
ignored), a `brainMask`, a recurrence (`segm_rec`) and no T1 or tissue maps, so the tissue
comes from the MNI152 atlas registered to the brain mask by its outline only
(rtjax.anatomy). Writes the case outputs and `gliodil_comparison.json` into OUT_DIR and
prints the comparison (volumes in mL, coverages in %).

    python scripts/gliodil_case.py OUT_DIR [--data DATA_ROOT]
    (DATA_ROOT default: RTJAX_DATA or ../shared/data, see rtjax.data)
"""

import argparse
from pathlib import Path

from rtjax.experiments.gliodil import format_comparison, run_gliodil_case

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output folder (the case outputs)")
    parser.add_argument("--data", type=Path, default=None,
                        help="real-data root (default: RTJAX_DATA or ../shared/data)")
    args = parser.parse_args()
    print(format_comparison(run_gliodil_case(args.out_dir, args.data)))
    print(f"wrote {args.out_dir / 'gliodil_comparison.json'}")
