"""Held-out simulated cases: Dice of the fitted vs true density, network alone and refined.

    python scripts/evaluate_fit.py [N_CASES] [OUT_JSON]
"""

import sys

from rtjax.fit_evaluation import evaluate_fit, format_fit_table
from rtjax.provenance import run_metadata, write_json_atomic

if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    result = evaluate_fit(n)
    print(format_fit_table(result))
    if len(sys.argv) > 2:
        write_json_atomic(sys.argv[2], {**result, **run_metadata()})
