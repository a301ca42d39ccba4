"""Train the learned inverse model; same as `rtjax train-inverse CONFIG --workdir DIR`.

    python scripts/train_inverse.py configs/inverse_cpu.yaml --workdir runs/inverse_cpu
"""

import sys

from rtjax.cli import app

if __name__ == "__main__":
    app(["train-inverse", *sys.argv[1:]])
