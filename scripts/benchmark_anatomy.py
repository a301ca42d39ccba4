"""Atlas tissue registration on the real data (SRI24, BRATS 2015): Dice and time per case;
see rtjax.experiments.anatomy_benchmark.

    python scripts/benchmark_anatomy.py [--quick]     (RTJAX_DATA or ../shared/data)
"""

import argparse

from rtjax.experiments.anatomy_benchmark import benchmark_anatomy

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one BRATS case only")
    benchmark_anatomy(quick=parser.parse_args().quick)
