"""Seconds per case of `rtjax fit` (network + refinement + final density) on this machine:
the Lipkova patient (256^3, 1 mm) and a few held-out simulated cases.

    python scripts/benchmark_fit.py [N_SIMULATED] [OUT_JSON]
"""

import argparse

from rtjax.experiments.fit_evaluation import benchmark_fit, format_benchmark_table
from rtjax.provenance import run_metadata, write_json_atomic

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n_simulated", type=int, nargs="?", default=2, help="simulated cases")
    parser.add_argument("out_json", nargs="?", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = benchmark_fit(n_simulated=args.n_simulated)
    print(format_benchmark_table(rows))
    if args.out_json:
        write_json_atomic(args.out_json, {"cases": rows, **run_metadata()})
