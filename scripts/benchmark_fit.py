"""Seconds per case of `rtjax fit` (network + refinement + final density) on this machine:
the Lipkova patient (256^3, 1 mm) and a few held-out simulated cases.

    python scripts/benchmark_fit.py [N_SIMULATED] [OUT_JSON]
"""

import sys

from rtjax.fit_evaluation import benchmark_fit, format_benchmark_table
from rtjax.provenance import run_metadata, write_json_atomic

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rows = benchmark_fit(n_simulated=n)
    print(format_benchmark_table(rows))
    if len(sys.argv) > 2:
        write_json_atomic(sys.argv[2], {"cases": rows, **run_metadata()})
