"""Train the segmentation ensemble; same as `rtjax train-seg CONFIG --workdir DIR`.

    python scripts/train_seg.py configs/seg_cpu.yaml --workdir runs/seg_cpu
"""

import sys

from rtjax.cli import app

if __name__ == "__main__":
    app(["train-seg", *sys.argv[1:]])
