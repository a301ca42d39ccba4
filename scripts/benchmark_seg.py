"""Time sliding-window segmentation of one 240x240x155 case (1 mm) on this machine.

    python scripts/benchmark_seg.py                      # the shipped weights
    python scripts/benchmark_seg.py --weights DIR        # another weights folder
    python scripts/benchmark_seg.py --config configs/seg_h100.yaml   # untrained, that size
    python scripts/benchmark_seg.py --tta                # with flip TTA (+ uncertainty)

Prints a table: weights, working spacing, window, members, first call (compilation
included) and steady-state seconds per case.
"""

import argparse
from pathlib import Path

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, action="append", default=None)
    parser.add_argument("--config", type=Path, action="append", default=None)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from rtjax.seg.device import benchmark_table

    print(benchmark_table(weights=args.weights, configs=args.config, tta=args.tta, repeats=args.repeats))
