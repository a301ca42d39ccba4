"""One time-budgeted accelerator job: train the inverse model, measure, time the fit.

On the H100 (from the repository root; the job keeps to --budget-s, a hard cap):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/device_inverse.py --budget-s 230 --out $OUT

CPU rehearsal of the same code path with the tiny config (`configs/inverse_tiny.yaml`):

    python scripts/device_inverse.py --tiny --budget-s 150 --out /tmp/device_tiny

Budget split (`rtjax.jobs.inverse.device_job`): 72 % of --budget-s less 5 s for
`train_and_evaluate` (data generation up to 30 % of that, training, then 25 s kept for the
validation and the export), the rest for timing network + refinement on held-out cases;
a watchdog thread ends the process at --budget-s whatever it is doing (exit code 3).

Writes into --out: `inverse_weights.tar.gz` (one folder `inverse/`, the layout of
`rtjax/weights/inverse`: unpack it into `rtjax/weights/` to ship it) and
`inverse_metrics.json` (validation metrics and loss curve, data-generation throughput,
network + refinement seconds per held-out case), rewritten after every stage. The training
data and checkpoints go to --workdir (default: a temporary folder). See
`rtjax.jobs.inverse.device_job`.
"""

import argparse
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

from rtjax.jobs.inverse import run_device_job  # noqa: E402 (after the clock starts)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, required=True, help="wall-clock budget, s")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--config", type=Path, default=CONFIGS / "inverse_h100.yaml")
    parser.add_argument("--tiny", action="store_true", help="use configs/inverse_tiny.yaml")
    parser.add_argument("--workdir", type=Path, default=None, help="data and checkpoints")
    parser.add_argument("--fit-cases", type=int, default=8, help="held-out cases to time")
    parser.add_argument("--fit-iterations", type=int, default=None,
                        help="refinement iterations (default: growth.fit.FitConfig's)")
    args = parser.parse_args()
    run_device_job(CONFIGS / "inverse_tiny.yaml" if args.tiny else args.config, args.budget_s,
                   args.out, workdir=args.workdir, fit_cases=args.fit_cases,
                   fit_iterations=args.fit_iterations, started=STARTED)
    sys.exit(0)
