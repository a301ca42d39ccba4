"""The `rtjax` command line: one subcommand per job, each a thin layer over a library call.

Heavy modules (JAX, nibabel, nilearn) are imported inside the commands, so `rtjax --help`
stays fast. Every command runs inside one error path (`_command`): a bad input, a bad
option or a filesystem error is one line `error: ...` on stderr (one per bad option) and
exit code 2, never a traceback; warnings print as `warning: ...` lines.

`--cutoff`, `--series` and `--names` take several values after one flag
(``--cutoff 0.01 0.1``) as well as repeated flags (``--cutoff 0.01 --cutoff 0.1``).
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

app = typer.Typer(
    help="rtjax: personalised glioma radiotherapy target volumes from MRI (JAX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "[default: 15]" and "wm/gm[/csf]" stay literal
)

Coordinate = tuple[float, float, float]


def _fail(message: str) -> None:
    for line in str(message).splitlines() or [""]:
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def _is_pair(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


#: Options that take several values after one flag, and what such a value looks like.
_MULTI_VALUE = {"--cutoff": _is_number, "--series": _is_pair, "--names": _is_pair,
                "--anisotropy": _is_number, "--dti-atlas": lambda arg: not arg.startswith("-")}


def expand_multi_values(args: list[str]) -> list[str]:
    """``--cutoff 0.01 0.1`` -> ``--cutoff 0.01 --cutoff 0.1`` (the same for ``--series`` and
    ``--names`` pairs, ``--anisotropy R_LO R_HI`` and ``--dti-atlas FA PEAKS``); everything
    after ``--`` is left alone."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if arg == "--":
            out += args[i:]
            break
        looks = _MULTI_VALUE.get(arg)
        if looks is None or i >= len(args):
            continue
        out.append(args[i])  # the flag's own value, whatever it is
        i += 1
        while i < len(args) and looks(args[i]):
            out += [arg, args[i]]
            i += 1
    return out


class _MultiValueCommand(TyperCommand):
    """A command whose `_MULTI_VALUE` options take several values after one flag."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_multi_values(list(args)))


def _os_error_message(err: OSError) -> str:
    """One line for a filesystem error: the file and what went wrong."""
    where = err.filename if err.filename is not None else ""
    what = err.strerror or str(err)
    return f"{where}: {what}" if where else what


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)


def _command(name: str | None = None, **kwargs):
    """`app.command` with the one error path of the CLI (see the module docstring)."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            from rtjax.errors import InputError  # light: no JAX

            previous = warnings.showwarning
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kw)
            except (InputError, ValueError, FileNotFoundError) as err:
                _fail(str(err))
            except OSError as err:
                _fail(_os_error_message(err))
            finally:
                warnings.showwarning = previous

        return app.command(name, **kwargs)(run)

    return register


@_command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Output density NIfTI (.nii or .nii.gz).")],
    dw: Annotated[float, typer.Option("--dw", help="White-matter diffusivity Dw, mm^2/day.")],
    rho: Annotated[float, typer.Option("--rho", help="Proliferation rate, 1/day.")],
    days: Annotated[float, typer.Option("--days", help="Simulated time, days.")],
    tissue: Annotated[Optional[Path], typer.Option("--tissue", help="Case folder with wm/gm[/csf] maps.")] = None,
    atlas: Annotated[Optional[str], typer.Option("--atlas", help="Built-in atlas: mni152.")] = None,
    wm: Annotated[Optional[Path], typer.Option("--wm", help="White-matter probability map.")] = None,
    gm: Annotated[Optional[Path], typer.Option("--gm", help="Grey-matter probability map.")] = None,
    csf: Annotated[Optional[Path], typer.Option("--csf", help="CSF probability map (excluded from growth).")] = None,
    origin_mm: Annotated[Optional[Coordinate], typer.Option("--origin-mm", help="Seed centre, world coordinates X Y Z in mm.")] = None,
    origin_vox: Annotated[Optional[Coordinate], typer.Option("--origin-vox", help="Seed centre, voxel I J K of the input file.")] = None,
    ratio: Annotated[float, typer.Option("--ratio", help="Dw/Dg, white- to grey-matter diffusivity.")] = 10.0,
    tensor: Annotated[Optional[Path], typer.Option("--tensor", help="DTI tensor, FSL dtifit 6 volumes (Dxx Dxy Dxz Dyy Dyz Dzz): anisotropic growth.")] = None,
    fa: Annotated[Optional[Path], typer.Option("--fa", help="FA map, with --peaks: anisotropic growth.")] = None,
    peaks: Annotated[Optional[Path], typer.Option("--peaks", help="Fibre peaks (MRtrix/TractSeg, world frame); the first peak is used.")] = None,
    anisotropy: Annotated[float, typer.Option("--anisotropy", help="Anisotropy r >= 1 of the tumour tensor (principal eigenvalue x r, trace kept).")] = 5.0,
    tensor_method: Annotated[str, typer.Option("--tensor-method", help="Tumour tensor construction: scaled or westin.")] = "scaled",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Forward Fisher-Kolmogorov simulation from a Gaussian seed; writes the tumour cell
    density on the tissue's grid, with a JSON sidecar of parameters and versions.
    With --tensor or --fa/--peaks, growth is anisotropic along the DTI fibres."""
    from rtjax.simulate import load_shape_tensor, load_tissue, simulate_to_file

    maps = load_tissue(tissue, atlas=atlas, wm=wm, gm=gm, csf=csf)
    shape_tensor = None
    if tensor is not None or fa is not None or peaks is not None:
        shape_tensor = load_shape_tensor(maps, tensor=tensor, fa=fa, peaks=peaks,
                                         anisotropy=anisotropy, method=tensor_method)
    density_path, sidecar = simulate_to_file(
        out, maps, dw=dw, rho=rho, days=days, ratio=ratio,
        origin_mm=origin_mm, origin_vox=origin_vox, shape_tensor=shape_tensor,
        progress=progress,
    )
    typer.echo(f"wrote {density_path}")
    typer.echo(f"wrote {sidecar}")


#: Options naming one input file each (role -> help); `run` and `fit` have them all.
_FILE_HELP = {
    "t1c": "T1c image.", "flair": "FLAIR image.", "t1": "T1 image (atlas registration).",
    "seg": "Tumour segmentation (labels in --labels).", "brain_mask": "Brain mask.",
    "recurrence": "Recurrence mask (coverage).", "wm": "White-matter probability map.",
    "gm": "Grey-matter probability map.", "csf": "CSF probability map.",
    "edema": "Edema mask as a separate file (TUM/Lipkova FLAIR masks).",
    "tensor": "DTI tensor, six volumes in FSL order (Dxx Dxy Dxz Dyy Dyz Dzz): the fit grows "
              "along its fibres.",
    "fa": "FA map of the DTI (with --peaks): the fit grows along the fibres.",
    "peaks": "Fibre peaks (MRtrix/TractSeg; with --fa); the first peak is used.",
}
_NAMES_HELP = ("ROLE=PATTERN: the file of a role found by a glob pattern in each case folder, "
               "e.g. --names seg=segm.nii.gz brain_mask=brainMask* (repeatable; roles: t1c, "
               "flair, t1, t2, seg, wm, gm, csf, brain_mask, tensor, fa, peaks, recurrence, "
               "edema).")

def _file_option(role: str):
    flag = "--" + role.replace("_", "-")
    return Annotated[Optional[Path], typer.Option(flag, help=f"{_FILE_HELP[role]} A bare file "
                                                  "name is taken in the case folder.")]


def _overrides(**files) -> dict[str, Path]:
    """The role -> file mapping of the file options given."""
    return {role: path for role, path in files.items() if path is not None}


@_command(cls=_MultiValueCommand)
def fit(
    case_dir: Annotated[Path, typer.Argument(help="Case folder with seg (else t1c + flair, segmented), wm + gm (else the registered atlas).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    labels: Annotated[str, typer.Option("--labels", help="Label convention of seg: brats2021, brats2023, brats2015, gliodil, tum.")],
    ignore_labels: Annotated[Optional[list[int]], typer.Option("--ignore-labels", help="Label values to drop explicitly (repeatable).")] = None,
    t1c: _file_option("t1c") = None,
    flair: _file_option("flair") = None,
    t1: _file_option("t1") = None,
    seg: _file_option("seg") = None,
    brain_mask: _file_option("brain_mask") = None,
    recurrence: _file_option("recurrence") = None,
    wm: _file_option("wm") = None,
    gm: _file_option("gm") = None,
    csf: _file_option("csf") = None,
    edema: _file_option("edema") = None,
    tensor: _file_option("tensor") = None,
    fa: _file_option("fa") = None,
    peaks: _file_option("peaks") = None,
    names: Annotated[Optional[list[str]], typer.Option("--names", help=_NAMES_HELP)] = None,
    start: Annotated[str, typer.Option("--start", help="Starting estimate: network or heuristic.")] = "network",
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Inverse-network weights folder (default: shipped).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Refinement iterations at most.")] = 150,
    tensor_frame: _FRAME_OPT = None,
    anisotropy: _ANISOTROPY_OPT = None,
    tensor_method: _METHOD_OPT = None,
    dti_atlas: _DTI_ATLAS_OPT = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Fit the growth model to a case: inverse network, then gradient refinement through the
    solver; writes density.nii.gz and params.json (with the fit quality) on the input grid.
    A case without seg is segmented from t1c + flair, one without wm/gm gets the atlas
    registered (tissue/); with DTI (--tensor, --fa/--peaks, --dti-atlas) the growth is
    anisotropic along the fibres."""
    from growth.fit import FitConfig
    from rtjax.pipeline.case import fit_case_dir
    from rtjax.pipeline.options import RunOptions, parse_names

    options = RunOptions(labels=labels, ignore_labels=tuple(ignore_labels or ()), start=start,
                         iterations=iterations, names=parse_names(names), tensor_frame=tensor_frame,
                         anisotropy=tuple(anisotropy or (5.0,)), tensor_method=tensor_method or "scaled",
                         dti_atlas=None if dti_atlas is None else tuple(str(p) for p in dti_atlas))
    overrides = _overrides(t1c=t1c, flair=flair, t1=t1, seg=seg, brain_mask=brain_mask,
                           recurrence=recurrence, wm=wm, gm=gm, csf=csf, edema=edema,
                           tensor=tensor, fa=fa, peaks=peaks)
    result, paths = fit_case_dir(
        case_dir, out, labels=options.labels, ignore_labels=options.ignore_labels,
        overrides=overrides, names=options.names, initial=options.start, weights=weights,
        tensor_frame=options.tensor_frame, anisotropy=options.anisotropy,
        tensor_method=options.tensor_method, dti_atlas=options.dti_atlas,
        progress=progress, config=FitConfig(max_iterations=options.iterations),
    )
    info = result.info
    typer.echo(f"Dice of the re-simulated core {info['dice_core']:.3f}, edema {info['dice_edema']:.3f}; "
               f"sqrt(Dw T) = {info['scaled_parameters']['sqrt_dw_t_mm']:.2f} mm, "
               f"sqrt(rho T) = {info['scaled_parameters']['sqrt_rho_t']:.2f}; "
               f"fit quality {info['quality']}")
    for path in paths:
        typer.echo(f"wrote {path}")


_RUN_HELP = {
    "labels": "Label convention of seg: brats2021, brats2023, brats2015, gliodil, tum.",
    "ignore_labels": "Label values to drop explicitly (repeatable).",
    "margin_mm": "Standard CTV margin from the tumour core, mm, more than 0 and at most 50 [default: 15].",
    "start": "Fit start: network or heuristic [default: network].",
    "iterations": "Refinement iterations at most [default: 150].",
    "cutoff": "Density cutoffs in (0, 1) of extra model CTVs ctv_model_c<cutoff>.nii.gz, "
              "e.g. --cutoff 0.01 0.1 (at most 4).",
    "rtstruct": "Also write rtstruct.dcm, a DICOM RT Structure Set for a planning system.",
    "ensemble": "Also fit an ensemble (network members and shifted imaging thresholds as "
                "starts) and write ctv_probability, density_mean and density_sd (about 7x the "
                "fit time).",
    "config": "YAML mapping of these option names (labels, ignore_labels, margin_mm, start, "
              "iterations, cutoffs, rtstruct, names, tensor_frame, anisotropy, tensor_method, "
              "dti_atlas, ensemble); command-line values win.",
    "tensor_frame": "Frame of the DTI files' components: fsl, voxel or world [default: fsl "
                    "for a tensor, world for peaks].",
    "anisotropy": "Anisotropy r of the tumour tensor with DTI: R (fixed) or R_LO R_HI (fitted "
                  "in that range), 1..25 [default: 5].",
    "tensor_method": "Tumour tensor construction: scaled or westin [default: scaled].",
    "dti_atlas": "FA PEAKS of a population DTI in the MNI152 frame (e.g. TractSeg's) for a "
                 "case without DTI: carried to it by the atlas registration.",
}


def _dti_options():
    """The DTI options shared by fit, run and cohort (annotations)."""
    return (
        Annotated[Optional[str], typer.Option("--tensor-frame", help=_RUN_HELP["tensor_frame"])],
        Annotated[Optional[list[float]], typer.Option("--anisotropy", help=_RUN_HELP["anisotropy"])],
        Annotated[Optional[str], typer.Option("--tensor-method", help=_RUN_HELP["tensor_method"])],
        Annotated[Optional[list[Path]], typer.Option("--dti-atlas", help=_RUN_HELP["dti_atlas"])],
    )


_FRAME_OPT, _ANISOTROPY_OPT, _METHOD_OPT, _DTI_ATLAS_OPT = _dti_options()


def _run_options(config, **given):
    """Resolve --config and the command line into run_case keyword arguments (every option
    checked here, before any work)."""
    from rtjax.pipeline.options import parse_names, resolve_options

    given["names"] = parse_names(given.get("names"))
    options = resolve_options(config, **given)
    return {"labels": options["labels"], "ignore_labels": tuple(options["ignore_labels"]),
            "margin_mm": options["margin_mm"], "initial": options["start"],
            "fit_iterations": options["iterations"], "cutoffs": tuple(options["cutoffs"]),
            "rtstruct": options["rtstruct"], "names": options["names"],
            "tensor_frame": options["tensor_frame"], "anisotropy": tuple(options["anisotropy"]),
            "tensor_method": options["tensor_method"], "dti_atlas": options["dti_atlas"],
            "ensemble": options["ensemble"]}


def _echo_case(summary, out: Path) -> None:
    typer.echo(f"standard CTV {summary['standard_volume_ml']:.1f} mL, model CTV "
               f"{summary['model_volume_ml']:.1f} mL (density >= {summary['cutoff']:.4g})"
               + "".join(f", {e['volume_ml']:.1f} mL at density >= {e['cutoff']:g}"
                         for e in summary["cutoff_ctvs"]))
    if summary["coverage"]:
        cov = summary["coverage"]
        typer.echo(f"recurrence coverage: standard {100 * cov['standard_coverage']:.1f} %, "
                   f"model {100 * cov['model_coverage']:.1f} %"
                   + "".join(f", {100 * e['coverage']:.1f} % at density >= {e['cutoff']:g}"
                             for e in cov["cutoff_ctvs"]))
    typer.echo(f"fit quality: {summary['quality']} (Dice core {summary['dice_core']:.2f}, "
               f"edema {summary['dice_edema']:.2f})")
    for name in summary["outputs"]:
        typer.echo(f"wrote {out / name}")


@_command(cls=_MultiValueCommand)
def run(
    case_dir: Annotated[Path, typer.Argument(help="Case folder with seg (else t1c + flair, segmented), wm + gm (else the registered atlas) [brain_mask, recurrence, t1c, flair], or DICOM series (t1c/, flair/ subfolders, or --series).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (written via OUT.partial, then renamed; an existing non-empty one is refused unless --overwrite).")],
    labels: Annotated[Optional[str], typer.Option("--labels", help=_RUN_HELP["labels"])] = None,
    ignore_labels: Annotated[Optional[list[int]], typer.Option("--ignore-labels", help=_RUN_HELP["ignore_labels"])] = None,
    t1c: _file_option("t1c") = None,
    flair: _file_option("flair") = None,
    t1: _file_option("t1") = None,
    seg: _file_option("seg") = None,
    brain_mask: _file_option("brain_mask") = None,
    recurrence: _file_option("recurrence") = None,
    wm: _file_option("wm") = None,
    gm: _file_option("gm") = None,
    csf: _file_option("csf") = None,
    edema: _file_option("edema") = None,
    tensor: _file_option("tensor") = None,
    fa: _file_option("fa") = None,
    peaks: _file_option("peaks") = None,
    names: Annotated[Optional[list[str]], typer.Option("--names", help=_NAMES_HELP)] = None,
    series: Annotated[Optional[list[str]], typer.Option("--series", help="ROLE=SeriesInstanceUID: pick each role's DICOM series from the files under the case folder, e.g. --series t1c=1.2.3 flair=1.2.4.")] = None,
    margin_mm: Annotated[Optional[float], typer.Option("--margin-mm", help=_RUN_HELP["margin_mm"])] = None,
    cutoff: Annotated[Optional[list[float]], typer.Option("--cutoff", help=_RUN_HELP["cutoff"])] = None,
    rtstruct: Annotated[Optional[bool], typer.Option("--rtstruct/--no-rtstruct", help=_RUN_HELP["rtstruct"], show_default=False)] = None,
    ensemble: Annotated[Optional[bool], typer.Option("--ensemble/--no-ensemble", help=_RUN_HELP["ensemble"], show_default=False)] = None,
    start: Annotated[Optional[str], typer.Option("--start", help=_RUN_HELP["start"])] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help=_RUN_HELP["iterations"])] = None,
    tensor_frame: _FRAME_OPT = None,
    anisotropy: _ANISOTROPY_OPT = None,
    tensor_method: _METHOD_OPT = None,
    dti_atlas: _DTI_ATLAS_OPT = None,
    config: Annotated[Optional[Path], typer.Option("--config", help=_RUN_HELP["config"])] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier rtjax output in --out.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """The whole pipeline for one case: segmentation (if no seg), atlas tissue (if no wm/gm),
    fit, density, standard, iso-volumetric and cutoff model CTVs, recurrence coverage when a
    recurrence is given, the fit-quality gate, report.png and report.html, all on the input
    grid. Every option and input is checked before any heavy work."""
    from rtjax.dicom import parse_series
    from rtjax.pipeline.case import run_case

    options = _run_options(config, labels=labels, ignore_labels=ignore_labels,
                           margin_mm=margin_mm, start=start, iterations=iterations,
                           cutoffs=cutoff, rtstruct=rtstruct, ensemble=ensemble, names=names,
                           tensor_frame=tensor_frame, anisotropy=anisotropy,
                           tensor_method=tensor_method,
                           dti_atlas=None if dti_atlas is None else [str(p) for p in dti_atlas])
    overrides = _overrides(t1c=t1c, flair=flair, t1=t1, seg=seg, brain_mask=brain_mask,
                           recurrence=recurrence, wm=wm, gm=gm, csf=csf, edema=edema,
                           tensor=tensor, fa=fa, peaks=peaks)
    summary = run_case(case_dir, out, overrides=overrides, series=parse_series(series),
                       overwrite=overwrite, progress=progress, **options)
    _echo_case(summary, out)


@_command(cls=_MultiValueCommand)
def cohort(
    cohort_dir: Annotated[Path, typer.Argument(help="Folder of case folders (each as for `rtjax run`).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: one folder per case, summary.csv, errors.log, study figures, cohort.json.")],
    labels: Annotated[Optional[str], typer.Option("--labels", help=_RUN_HELP["labels"])] = None,
    ignore_labels: Annotated[Optional[list[int]], typer.Option("--ignore-labels", help=_RUN_HELP["ignore_labels"])] = None,
    names: Annotated[Optional[list[str]], typer.Option("--names", help=_NAMES_HELP)] = None,
    margin_mm: Annotated[Optional[float], typer.Option("--margin-mm", help=_RUN_HELP["margin_mm"])] = None,
    cutoff: Annotated[Optional[list[float]], typer.Option("--cutoff", help=_RUN_HELP["cutoff"])] = None,
    rtstruct: Annotated[Optional[bool], typer.Option("--rtstruct/--no-rtstruct", help=_RUN_HELP["rtstruct"], show_default=False)] = None,
    ensemble: Annotated[Optional[bool], typer.Option("--ensemble/--no-ensemble", help=_RUN_HELP["ensemble"], show_default=False)] = None,
    start: Annotated[Optional[str], typer.Option("--start", help=_RUN_HELP["start"])] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help=_RUN_HELP["iterations"])] = None,
    tensor_frame: _FRAME_OPT = None,
    anisotropy: _ANISOTROPY_OPT = None,
    tensor_method: _METHOD_OPT = None,
    dti_atlas: _DTI_ATLAS_OPT = None,
    config: Annotated[Optional[Path], typer.Option("--config", help=_RUN_HELP["config"])] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: run only cases i (sorted, 0-based) with i % N == K-1, e.g. one cluster array job per shard.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Only 1: JAX already uses every core; parallelise with one process per --shard.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Use an --out made with other options (or not by rtjax cohort), redoing the cases made with other options.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Run every case of a cohort: resumable (finished cases are skipped, interrupted ones
    redone), a failing case is logged with its reason and the others go on; summary.csv
    (with a fit-quality column) and, with >= 2 recurrences, the coverage study at the end.
    Exit code 1 when some case failed."""
    from rtjax.pipeline.cohort import run_cohort
    from rtjax.pipeline.options import parse_shard

    options = _run_options(config, labels=labels, ignore_labels=ignore_labels,
                           margin_mm=margin_mm, start=start, iterations=iterations,
                           cutoffs=cutoff, rtstruct=rtstruct, ensemble=ensemble, names=names,
                           tensor_frame=tensor_frame, anisotropy=anisotropy,
                           tensor_method=tensor_method,
                           dti_atlas=None if dti_atlas is None else [str(p) for p in dti_atlas])
    parse_shard(shard)
    result = run_cohort(cohort_dir, out, shard=shard, jobs=jobs, progress=progress,
                        overwrite=overwrite, **options)
    typer.echo(f"{len(result.processed) + len(result.skipped)} done "
               f"({len(result.processed)} run now, {len(result.skipped)} already done), "
               f"{len(result.failed)} failed"
               + (f", {len(result.busy)} running in another process" if result.busy else ""))
    poor = [row["case"] for row in result.rows if row.get("quality") == "poor"]
    if poor:
        typer.echo(f"fit quality poor (see summary.csv, quality_reasons): {', '.join(poor)}")
    for case, message in result.failed:
        typer.secho(f"failed {case}: {message}", fg=typer.colors.RED, err=True)
    for path in result.files:
        typer.echo(f"wrote {path}")
    if result.failed:
        raise typer.Exit(code=1)


@_command()
def benchmark(
    quick: Annotated[bool, typer.Option("--quick", help="Small grids, for a smoke run.")] = False,
    jax_steps: Annotated[int, typer.Option("--jax-steps", help="Time steps per JAX run.")] = 100,
    numpy_steps: Annotated[int, typer.Option("--numpy-steps", help="Time steps per NumPy run.")] = 5,
    batch: Annotated[int, typer.Option("--batch", help="Parameter sets in the vmapped run.")] = 16,
) -> None:
    """Print the FK solver's throughput beside a plain-NumPy version of the same scheme, and
    the anisotropic step beside the isotropic one."""
    import jax

    from rtjax.data import DataNotFoundError, data_root
    from rtjax.experiments.benchmark import (
        benchmark_anisotropic_step,
        benchmark_solver,
        format_step_table,
        format_table,
    )

    rows = benchmark_solver(jax_steps=jax_steps, numpy_steps=numpy_steps, batch=batch, quick=quick)
    device = f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {jax.device_count()} device(s))"
    typer.echo(format_table(rows, device))
    try:
        dti = data_root() / "dti" / "tractseg"
        dti = dti if (dti / "FA.nii.gz").exists() else None
    except DataNotFoundError:
        dti = None
    step_rows = benchmark_anisotropic_step(
        steps=jax_steps, quick=quick, tractseg_fa=dti and dti / "FA.nii.gz",
        tractseg_peaks=dti and dti / "peaks.nii.gz")
    typer.echo("")
    typer.echo(format_step_table(step_rows, device))


@_command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("rtjax_demo"),
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML overriding the demo patient (see configs/demo.yaml).")] = None,
) -> None:
    """The whole pipeline on a built-in synthetic patient grown in the MNI152 atlas: tumour,
    recurrence after resection, fit, standard and model CTVs, coverage (CPU, a minute or two)."""
    from rtjax.experiments.demo import demo_summary, load_patient_config, run_demo

    patient = load_patient_config(config) if config else None
    for path in run_demo(out, patient):
        typer.echo(f"wrote {path}")
    typer.echo(demo_summary(out))


@_command()
def tissue(
    case_dir: Annotated[Path, typer.Argument(help="Case folder: t1 or t1c (else only brain_mask: registered by its outline) [seg, brain_mask], or its own wm, gm [csf].")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    deformable: Annotated[bool, typer.Option("--deformable/--affine-only", help="Atlas registration: affine then SyN, or affine only.")] = True,
) -> None:
    """Tissue maps of a case: its own wm/gm/csf, or the MNI152 atlas registered to its T1
    (else T1c, else its brain_mask outline) with ANTs, the tumour (seg) masked out of the
    cost; writes wm, gm, csf, brain_mask (.nii.gz, input grid), tissue.png and tissue.json.
    A rerun reuses them."""
    from rtjax.anatomy import case_tissue

    result = case_tissue(case_dir, out, deformable=deformable, log=typer.echo)
    typer.echo(f"tissue from the {result.info['source']}; tumour masked from the cost: "
               f"{result.info['tumour_masked']}")
    for name in ("wm.nii.gz", "gm.nii.gz", "csf.nii.gz", "brain_mask.nii.gz", "tissue.png", "tissue.json"):
        typer.echo(f"wrote {out / name}")


@_command("train-seg")
def train_seg(
    config: Annotated[Path, typer.Argument(help="YAML config: configs/seg_slices.yaml (the shipped 2.5-D "
                                                "recipe) or a 3-D one (configs/seg_cpu.yaml, seg_h100.yaml).")],
    workdir: Annotated[Path, typer.Option("--workdir", help="Checkpoints, bank, leave-one-out results, weights/.")],
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Wall-clock budget, s (overrides train.max_seconds).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Real-data root searched for labelled cases (overrides the config's data root).")] = None,
    fold: Annotated[Optional[list[int]], typer.Option("--fold", help="2.5-D only: train just this fold (repeatable) and stop before cross-validation, to train folds in parallel processes on one --workdir; then run once without --fold to cross-validate and export.")] = None,
    view: Annotated[Optional[list[str]], typer.Option("--view", help="2.5-D only: train just the fold models of this view of model.views (axial, coronal, sagittal; repeatable), like --fold.")] = None,
    final: Annotated[bool, typer.Option("--final", help="2.5-D only: train just the final models (one per view, or per --view, on every case; train.final_steps) from the fold-0 checkpoints, then stop.")] = False,
) -> None:
    """Train a segmentation ensemble and write WORKDIR/weights (the shipped layout); resumes
    from WORKDIR's checkpoints. A config with `architecture: slices` (configs/seg_slices.yaml)
    trains the 2.5-D model k-fold by patient on the real labelled cases and cross-validates
    it; otherwise the 3-D model (FK tumour bank, synthetic base model, leave-one-out
    fine-tunes, final fine-tune)."""
    import dataclasses

    from rtjax.config import read_yaml
    from rtjax.seg.config import load_config
    from rtjax.seg.slices import ARCHITECTURE
    from rtjax.seg.slice_train import load_slice_config, train_slices
    from rtjax.seg.train import train_and_evaluate

    if (read_yaml(config) or {}).get("architecture") == ARCHITECTURE:
        cfg = load_slice_config(config)
        changes = {k: v for k, v in (("max_seconds", max_seconds), ("data_root", data and str(data))) if v is not None}
        try:
            result = train_slices(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes)), workdir,
                                  folds=fold or None, views=view or None, final=final)
        except ValueError as err:
            _fail(str(err))
        if fold or view or final:
            typer.echo(f"trained fold(s) {result['trained_folds']} of view(s) {result['trained_views']} "
                       f"to step(s) {result['steps']}")
            return
        typer.echo(f"cross-validation mean: {result['mean']}")
        typer.echo(f"wrote {result['weights']}")
        return
    if fold or view or final:
        _fail(f"{config}: --fold, --view and --final apply to the 2.5-D model (architecture: slices) only")
    cfg = load_config(config)
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data)))
    result = train_and_evaluate(cfg, workdir, max_seconds=max_seconds)
    typer.echo(f"wrote {result['weights']}")


@_command("train-inverse")
def train_inverse(
    config: Annotated[Path, typer.Argument(help="YAML config of overrides, e.g. configs/inverse_cpu.yaml.")],
    workdir: Annotated[Path, typer.Option("--workdir", help="Simulated data, checkpoints, weights/.")],
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Wall-clock budget, s (overrides train.max_seconds).")] = None,
) -> None:
    """Train the inverse model (masks -> growth parameters) on simulations it generates:
    resumes from WORKDIR's checkpoints, validates on held-out simulations and writes
    WORKDIR/weights (the shipped layout; use it with --weights)."""
    from rtjax.inverse.config import load_config, with_budget
    from rtjax.inverse.train import train_and_evaluate

    cfg = load_config(config)
    if max_seconds is not None:
        cfg = with_budget(cfg, max_seconds)
    result = train_and_evaluate(cfg, workdir)
    typer.echo(f"wrote {result['weights']} ({result['step']} steps, stopped by {result['stopped_by']})")


@_command()
def segment(
    case_dir: Annotated[Path, typer.Argument(help="Case folder with t1c and flair (BraTS 2021/2023 names accepted).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    labels: Annotated[str, typer.Option("--labels", help="Output label convention: brats2021 (4 = ET) or brats2023 (3 = ET).")] = "brats2021",
    uncertainty: Annotated[bool, typer.Option("--uncertainty/--no-uncertainty", help="Ensemble spread (3-D weights: with flip TTA); writes segmentation_uncertainty.nii.gz.")] = False,
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Flip test-time augmentation (default: the weights' setting; 2.5-D: the in-plane flips, 4x the time).")] = None,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Weights folder (default: the shipped rtjax/weights/seg).")] = None,
) -> None:
    """Segment necrosis, enhancing tumour and edema from T1c + FLAIR; writes
    segmentation.nii.gz (uint8, on the input grid) and volumes in mL."""
    from rtjax.labels import get_convention, split_labels
    from rtjax.seg.infer import segment_case, write_segmentation

    if labels.lower() not in ("brats2021", "brats2023"):
        _fail(f"--labels must be brats2021 or brats2023, got {labels!r}")
    label_array, unc, ref = segment_case(case_dir, weights=weights, labels=labels, uncertainty=uncertainty, tta=tta)
    paths = write_segmentation(out, label_array, unc, ref)
    masks = split_labels(label_array, get_convention(labels))
    ml = ref.voxel_volume_ml
    for path in paths:
        typer.echo(f"wrote {path}")
    typer.echo(f"volumes (mL): necrosis {masks.necrosis.sum() * ml:.1f}, enhancing {masks.enhancing.sum() * ml:.1f}, "
               f"edema {masks.edema.sum() * ml:.1f}, whole tumour {masks.whole.sum() * ml:.1f}")


@_command("export-rtstruct")
def export_rtstruct(
    out_dir: Annotated[Path, typer.Argument(help="A finished `rtjax run` output folder.")],
    t1c: Annotated[Optional[Path], typer.Option("--t1c", help="T1c NIfTI for the MR series (default: params.json inputs).")] = None,
) -> None:
    """Write rtstruct.dcm (GTV, Edema, CTV_standard_<margin>mm, CTV_model, each cutoff CTV)
    into a run's output folder, referring to the case's DICOM series when it came as DICOM,
    else to an MR series written from the T1c (mr_t1c/)."""
    from rtjax.rtstruct import export_rtstruct as export

    result = export(out_dir, t1c=t1c)
    for name, roi in result["rois"].items():
        typer.echo(f"{name}: {roi['volume_ml']:.2f} mL")
    typer.echo(f"wrote {result['rtstruct']} (series {result['referenced_series']})")
    if result["mr_series"] is not None:
        typer.echo(f"wrote {result['mr_series']}/")


@_command()
def version() -> None:
    """Print the rtjax, JAX and device versions."""
    from rtjax.provenance import run_metadata

    for key, value in run_metadata().items():
        typer.echo(f"{key}: {value}")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
