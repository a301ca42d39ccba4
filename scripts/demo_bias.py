"""The shipped segmentation network on the demo patient rendered with bias fields of other
strengths (rtjax.experiments.seg_probes.bias_rows), from a `rtjax demo` output folder.

    python scripts/demo_bias.py rtjax_demo [--bias 0 0.1 0.3]
"""

import argparse
from pathlib import Path

from rtjax.experiments.seg_probes import bias_rows

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", type=Path, help="folder written by `rtjax demo` (case/, truth/)")
    parser.add_argument("--bias", type=float, nargs="+", default=[0.0, 0.1, 0.3],
                        help="log-amplitudes of the bias field (RenderConfig.bias)")
    args = parser.parse_args()
    print("| bias | Dice WT | Dice ET | network WT (mL) | reference WT (mL) |\n|---|---|---|---|---|")
    for r in bias_rows(args.demo_dir, args.bias):
        print(f"| {r['bias']:g} | {r['dice_WT']:.3f} | {r['dice_ET']:.3f} | {r['network_wt_ml']:.1f} | "
              f"{r['reference_wt_ml']:.1f} |")
