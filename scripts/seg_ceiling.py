"""The Dice a perfect network on the working grid would reach on each case's own grid, with
targets thresholded at half a working voxel (hard) or the share of each voxel (soft)
(rtjax.experiments.seg_probes.resolution_ceiling_rows).

    python scripts/seg_ceiling.py [--data ../shared/data] [--spacing 2.0]
"""

import argparse
from pathlib import Path

from rtjax.data import data_root
from rtjax.experiments.seg_probes import resolution_ceiling_rows
from rtjax.seg.model import REGIONS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="data root (default RTJAX_DATA or ../shared/data)")
    parser.add_argument("--spacing", type=float, default=2.0, help="working grid spacing, mm")
    args = parser.parse_args()
    rows = resolution_ceiling_rows(args.data or data_root(), args.spacing)
    cells = lambda row: " | ".join(f"{row[f'{kind}_dice_{r}']:.3f}" for kind in ("hard", "soft") for r in REGIONS)
    head = " | ".join(f"{kind} {r}" for kind in ("hard", "soft") for r in REGIONS)
    print(f"| case | {head} |\n|---|" + "---|" * 2 * len(REGIONS))
    for row in rows:
        print(f"| {row['case']} | {cells(row)} |")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "case"}
    print(f"| **mean** ({len(rows)} cases, {args.spacing:g} mm) | {cells(mean)} |")
