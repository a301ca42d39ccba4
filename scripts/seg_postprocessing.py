"""Per-case held-out Dice and enhancing-tumour volume of a 2.5-D training workdir's chosen
post-processing beside variants of it, from its cross-validation cache
(rtjax.experiments.seg_probes.postprocessing_rows).

    python scripts/seg_postprocessing.py runs/seg07 --vary refine_against_edema=false

Each --vary FIELD=VALUE (a `rtjax.seg.postprocessing.Postprocessing` field) adds a column: the
chosen post-processing (cv.json) with that one field changed.
"""

import argparse
import json
from pathlib import Path

import yaml

from rtjax.data import data_root
from rtjax.experiments.seg_probes import postprocessing_rows
from rtjax.seg.postprocessing import Postprocessing


def _variant(chosen: Postprocessing, change: str) -> Postprocessing:
    field, sep, value = change.partition("=")
    if not sep or field not in Postprocessing._fields:
        raise SystemExit(f"--vary {change!r}: expected FIELD=VALUE with FIELD among {list(Postprocessing._fields)}")
    return chosen._replace(**{field: type(getattr(chosen, field))(yaml.safe_load(value))})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="rtjax train-seg workdir (with cv.json and cv_probs/)")
    parser.add_argument("--vary", action="append", default=[], metavar="FIELD=VALUE",
                        help="a variant of the chosen post-processing with FIELD set to VALUE (repeatable)")
    parser.add_argument("--data", type=Path, default=None, help="data root (default RTJAX_DATA or ../shared/data)")
    args = parser.parse_args()
    summary = args.workdir / "cv.json"
    if not summary.is_file():
        raise SystemExit(f"{summary}: not found (run `rtjax train-seg CONFIG --workdir {args.workdir}` first)")
    chosen = Postprocessing.of(json.loads(summary.read_text())["postprocessing"])
    candidates = [chosen, *(_variant(chosen, change) for change in args.vary)]
    for k, candidate in enumerate(candidates):
        print(f"{'chosen' if k == 0 else f'variant {k}'}: {candidate.label()}")
    rows = postprocessing_rows(args.workdir, args.data or data_root(), candidates)
    names = ["chosen", *(f"variant {k}" for k in range(1, len(candidates)))]
    print("\n| case | reference ET (mL) | " + " | ".join(f"{n}: ET (mL) | {n}: Dice WT / TC / ET" for n in names)
          + " |\n|---|---|" + "---|---|" * len(candidates))
    cells = lambda r: " | ".join(f"{r[c.label()]['et_ml']:.1f} | {r[c.label()]['dice_WT']:.3f} / "
                                 f"{r[c.label()]['dice_TC']:.3f} / {r[c.label()]['dice_ET']:.3f}" for c in candidates)
    for r in rows:
        print(f"| {r['case']} | {r['reference_et_ml']:.1f} | {cells(r)} |")
    mean = lambda c, key: sum(r[c.label()][key] for r in rows) / len(rows)
    print(f"| **mean** ({len(rows)} cases) | |" + "".join(
        f" | {mean(c, 'dice_WT'):.3f} / {mean(c, 'dice_TC'):.3f} / {mean(c, 'dice_ET'):.3f} |" for c in candidates))
