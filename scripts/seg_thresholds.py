"""Held-out Dice at other probability thresholds, where the missed tumour sits, and how bright
each reference enhancing tumour is on the T1c, from a 2.5-D training workdir's
cross-validation cache (rtjax.experiments.seg_probes).

    python scripts/seg_thresholds.py runs/seg_slices [--data ../shared/data]
"""

import argparse
from pathlib import Path

from rtjax.data import data_root
from rtjax.experiments.seg_probes import contrast_rows, held_out_cases, missed_rows, threshold_rows

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="rtjax train-seg workdir (with cv_probs/)")
    parser.add_argument("--data", type=Path, default=None, help="data root (default RTJAX_DATA or ../shared/data)")
    args = parser.parse_args()
    cases = held_out_cases(args.workdir, args.data or data_root())
    print("| threshold | Dice WT | Dice TC | Dice ET | lowest Dice WT |\n|---|---|---|---|---|")
    for r in threshold_rows(cases):
        print(f"| {r['threshold']:g} | {r['dice_WT']:.3f} | {r['dice_TC']:.3f} | {r['dice_ET']:.3f} "
              f"| {r['min_dice_WT']:.3f} |")
    print("\n| case | reference WT (mL) | network WT at 0.5 before post-processing (mL) | missed (mL) "
          "| missed with p < 0.3 | p < 0.1 |\n|---|---|---|---|---|---|")
    for r in missed_rows(cases):
        print(f"| {r['case']} | {r['reference_ml']:.1f} | {r['network_ml']:.1f} | {r['missed_ml']:.1f} | "
              f"{r['missed_below_0.3']:.2f} | {r['missed_below_0.1']:.2f} |")
    print("\n| case | T1c z in reference ET | T1c z in healthy brain |\n|---|---|---|")
    for r in contrast_rows(args.workdir, args.data or data_root()):
        print(f"| {r['case']} | {r['enhancing_z']:.2f} | {r['healthy_z']:.2f} |")
