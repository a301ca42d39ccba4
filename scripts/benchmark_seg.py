"""Segmentation benchmark on this machine: training throughput of the 2.5-D recipe beside
the 3-D one it replaced, and inference seconds per 240x240x155 case (1 mm, no TTA).

    python scripts/benchmark_seg.py                          # the shipped weights
    python scripts/benchmark_seg.py --weights A --weights B  # weights folders side by side
"""

import argparse
from pathlib import Path

from rtjax.experiments.seg_benchmark import benchmark_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, action="append", default=None,
                        help="weights folder (repeatable; default: the shipped weights)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(benchmark_table(weights=args.weights or (None,), repeats=args.repeats))
