"""Held-out simulated cases: Dice of the fitted vs true density, network alone and refined.

    python scripts/evaluate_fit.py [N_CASES] [--out OUT_JSON] [--anisotropic [--anisotropy A]]
        [--iterations N] [--seed S] [--weights DIR]

--anisotropic grows the truth along the TractSeg DTI fibres (needs the real data folder,
RTJAX_DATA or ../shared/data) and fits it with the isotropic model, as usual.
"""

import argparse

from rtjax.experiments.fit_evaluation import evaluate_fit, format_fit_table
from rtjax.provenance import run_metadata, write_json_atomic

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n_cases", type=int, nargs="?", default=20)
    parser.add_argument("out_json", nargs="?", default=None)
    parser.add_argument("--out", dest="out", default=None)
    parser.add_argument("--anisotropic", action="store_true")
    parser.add_argument("--anisotropy", type=float, default=5.0)
    parser.add_argument("--iterations", type=int, default=None,
                        help="refinement iterations at most (default: growth.fit.FitConfig's)")
    parser.add_argument("--seed", type=int, default=90_210)
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    result = evaluate_fit(args.n_cases, seed=args.seed, iterations=args.iterations,
                          weights=args.weights, anisotropic=args.anisotropic,
                          anisotropy=args.anisotropy, progress=True)
    print(format_fit_table(result))
    out = args.out or args.out_json
    if out:
        write_json_atomic(out, {**result, **run_metadata()})
