"""Synthetic cohort study: N patients grown along DTI fibres in the MNI152 atlas, each with a
recurrence after resection, fitted with the isotropic model by the pipeline; coverage of
the recurrence by the standard, model and oracle CTVs at equal volume, paired tests, a
table and a figure (see rtjax.cohort_study). Resumable: rerun the same command.

    python scripts/cohort_study.py N OUT_DIR [--seed S] [--isotropic-truth]
        [--arms model anisotropic mismatch] [--anisotropy-range 2 10] [--perturbation-deg 25]
        [--grid-mm 2] [--iterations 150] [--cutoff 0.001 0.01 0.1]
    (data from RTJAX_DATA or ../shared/data)
"""

import argparse

from rtjax.experiments.cohort_study import ARMS, format_study_table, run_cohort_study

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, help="number of synthetic patients")
    parser.add_argument("out_dir", help="output folder (e.g. runs/cohort_study)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--isotropic-truth", action="store_true",
                        help="grow the truth isotropically (the fitted model's own family)")
    parser.add_argument("--arms", nargs="+", default=["model"], choices=ARMS,
                        help="fitted arms: model (isotropic), anisotropic (the truth's DTI), "
                             "mismatch (a perturbed DTI)")
    parser.add_argument("--anisotropy-range", nargs=2, type=float, default=[2.0, 10.0],
                        help="r of the anisotropic fits, fitted in this range")
    parser.add_argument("--perturbation-deg", type=float, default=25.0,
                        help="rms rotation of the mismatch arm's DTI, degrees")
    parser.add_argument("--grid-mm", type=int, default=2,
                        help="study grid spacing, mm: the 1 mm MNI152 anatomy block-averaged by "
                             "this whole factor (default 2; 3 is ~7x faster)")
    parser.add_argument("--iterations", type=int, default=150,
                        help="refinement iterations of each fit at most (default 150)")
    parser.add_argument("--cutoff", nargs="*", type=float, default=[],
                        help="density cutoffs: each fit also writes the cutoff CTVs and the "
                             "study reports their coverage and volume")
    args = parser.parse_args()
    evaluations = run_cohort_study(args.n, args.out_dir, seed=args.seed,
                                   isotropic_truth=args.isotropic_truth, arms=args.arms,
                                   anisotropy_range=tuple(args.anisotropy_range),
                                   perturbation_deg=args.perturbation_deg, factor=args.grid_mm,
                                   run_options={"fit_iterations": args.iterations,
                                                **({"cutoffs": args.cutoff} if args.cutoff else {})})
    print(format_study_table(evaluations))
    print(f"wrote {args.out_dir}/cohort_study.csv, cohort_study_summary.csv, "
          f"cohort_study_statistics.json and cohort_study.png")
