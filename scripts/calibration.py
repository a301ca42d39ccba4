"""Calibration of the probabilistic CTV (`rtjax run --ensemble`) on a synthetic cohort
study folder (scripts/cohort_study.py): reliability against the true density's CTV,
coverage of the p >= 0.5 / 0.9 regions, the probability-ranked CTV against the point
estimate at equal volume; see rtjax.experiments.calibration.

    python scripts/calibration.py STUDY_DIR [N_PATIENTS]
"""

import argparse

from rtjax.experiments.calibration import format_calibration, run_calibration

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", help="a cohort study folder (cases/, truth/)")
    parser.add_argument("n", type=int, nargs="?", default=10, help="patients (the first N)")
    args = parser.parse_args()
    print(format_calibration(run_calibration(args.study_dir, args.n)))
    print(f"wrote {args.study_dir}/calibration.json and calibration.csv")
