"""The anisotropic solver and fit on this machine: the step (forward and value+grad) beside
the isotropic one, and the wall time of an anisotropic `fit_case` of a tumour grown along
the TractSeg fibres (needs the real data folder, RTJAX_DATA or ../shared/data).

    python scripts/benchmark_anisotropic.py [--steps N] [--quick] [--no-fit] [--out OUT_JSON]
"""

import argparse
import dataclasses
import warnings

import jax

from rtjax.data import data_root
from rtjax.experiments.benchmark import (
    benchmark_anisotropic_fit,
    benchmark_anisotropic_step,
    format_fit_timing,
    format_step_table,
)
from rtjax.provenance import run_metadata, write_json_atomic

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-fit", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dti = data_root() / "dti" / "tractseg"
    steps = benchmark_anisotropic_step(steps=args.steps, quick=args.quick,
                                       tractseg_fa=dti / "FA.nii.gz", tractseg_peaks=dti / "peaks.nii.gz")
    print(format_step_table(steps, jax.default_backend()))
    fits = []
    if not args.no_fit:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits = benchmark_anisotropic_fit(dti / "FA.nii.gz", dti / "peaks.nii.gz")
        print()
        print(format_fit_timing(fits))
    if args.out:
        write_json_atomic(args.out, {"steps": [dataclasses.asdict(r) for r in steps],
                                     "fits": fits, **run_metadata()})
