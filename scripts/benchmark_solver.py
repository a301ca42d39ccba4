"""Print FK solver throughput (JAX vs plain NumPy); same as `rtjax benchmark [OPTIONS]`."""

import sys

from rtjax.cli import app

if __name__ == "__main__":
    app(["benchmark", *sys.argv[1:]])
