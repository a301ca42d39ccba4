"""Held-out Dice of each subset of views of a multi-view 2.5-D training workdir, from its
cross-validation cache (rtjax.experiments.seg_probes.view_rows).

    python scripts/seg_views.py runs/seg_views [--data ../shared/data]
"""

import argparse
from itertools import combinations
from pathlib import Path

from rtjax.data import data_root
from rtjax.experiments.seg_probes import view_rows
from rtjax.seg.slices import VIEWS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="rtjax train-seg workdir (with cv_probs/ of every view)")
    parser.add_argument("--data", type=Path, default=None, help="data root (default RTJAX_DATA or ../shared/data)")
    parser.add_argument("--views", nargs="+", default=["axial", "coronal", "sagittal"], choices=list(VIEWS),
                        help="views whose subsets are scored")
    args = parser.parse_args()
    subsets = [s for n in range(1, len(args.views) + 1) for s in combinations(args.views, n)]
    print("| views | cases | Dice WT | Dice TC | Dice ET |\n|---|---|---|---|---|")
    for r in view_rows(args.workdir, args.data or data_root(), subsets):
        print(f"| {r['views']} | {r['cases']} | {r['dice_WT']:.3f} | {r['dice_TC']:.3f} | {r['dice_ET']:.3f} |")
