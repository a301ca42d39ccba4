"""Carry the finished models of a 2.5-D training workdir between sessions or machines in
about 1 MB each (float16 parameters, as the export stores them) instead of their 2-5.5 MB
checkpoints.

    python scripts/seg_pack.py pack CONFIG WORKDIR PACKED     # finished models -> PACKED/<member>.npz
    python scripts/seg_pack.py unpack CONFIG PACKED WORKDIR   # back into checkpoints; then
    rtjax train-seg CONFIG --workdir WORKDIR                  # resumes them as finished
"""

import argparse
from pathlib import Path

from rtjax.seg.slice_train import load_slice_config, pack_finished_models, unpack_finished_models

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("config", type=Path, help="the run's 2.5-D config (configs/seg_slices.yaml or a copy)")
    parser.add_argument("source", type=Path, help="pack: the workdir; unpack: the packed folder")
    parser.add_argument("target", type=Path, help="pack: the packed folder; unpack: the workdir")
    args = parser.parse_args()
    cfg = load_slice_config(args.config)
    action = pack_finished_models if args.action == "pack" else unpack_finished_models
    names = action(cfg, args.source, args.target)
    print(f"{args.action}ed {len(names)} finished model(s) into {args.target}: {', '.join(names) or 'none'}")
