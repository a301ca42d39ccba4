"""Isotropic vs anisotropic growth from seeds in the corpus callosum and the corticospinal
tract on the TractSeg DTI; prints the along/across-fibre spread and writes a figure.

    python scripts/fibre_study.py [OUT_DIR]      (data from RTJAX_DATA or ../shared/data)
"""

import argparse

from rtjax.data import data_root
from rtjax.experiments.fibre_study import run_fibre_study

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="fibre_study", help="output folder")
    out = parser.parse_args().out_dir
    for run in run_fibre_study(data_root(), out):
        print(f"{run.tract:22s} spread along/across fibre: isotropic {run.ratio_isotropic:.2f}, "
              f"anisotropic {run.ratio_anisotropic:.2f} ({run.stencil_offsets} stencil offsets)")
    print(f"wrote {out}/fibre_study.png and {out}/fibre_study.json")
