"""The `rtjax` command line: one subcommand per job, each a thin layer over a library call.

Heavy modules (JAX, nibabel, nilearn) are imported inside the commands, so `rtjax --help`
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="rtjax: personalised glioma radiotherapy target volumes from MRI (JAX).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Coordinate = tuple[float, float, float]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
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
    from rtjax.errors import InputError
    from rtjax.simulate import load_shape_tensor, load_tissue, simulate_to_file

    try:
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
    except (InputError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"wrote {density_path}")
    typer.echo(f"wrote {sidecar}")


@app.command()
def fit(
    case_dir: Annotated[Path, typer.Argument(help="Case folder with seg (else t1c + flair, segmented), wm + gm (else the registered atlas).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    labels: Annotated[str, typer.Option("--labels", help="Label convention of seg: brats2021, brats2023, brats2015, gliodil, tum.")],
    ignore_labels: Annotated[Optional[list[int]], typer.Option("--ignore-labels", help="Label values to drop explicitly (repeatable).")] = None,
    seg: Annotated[Optional[Path], typer.Option("--seg", help="Segmentation file (default: found in the folder).")] = None,
    wm: Annotated[Optional[Path], typer.Option("--wm", help="White-matter probability map.")] = None,
    gm: Annotated[Optional[Path], typer.Option("--gm", help="Grey-matter probability map.")] = None,
    edema: Annotated[Optional[Path], typer.Option("--edema", help="Edema mask as a separate file (TUM/Lipkova FLAIR masks).")] = None,
    start: Annotated[str, typer.Option("--start", help="Starting estimate: network or heuristic.")] = "network",
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Inverse-network weights folder (default: shipped).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Refinement iterations at most.")] = 150,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Fit the growth model to a case: inverse network, then gradient refinement through the
    solver; writes density.nii.gz and params.json on the input grid. A case without seg is
    segmented from t1c + flair, one without wm/gm gets the atlas registered (tissue/)."""
    from growth.fit import FitConfig
    from rtjax.errors import InputError
    from rtjax.fit import fit_case_dir

    overrides = {k: v for k, v in (("seg", seg), ("wm", wm), ("gm", gm), ("edema", edema)) if v}
    try:
        result, paths = fit_case_dir(
            case_dir, out, labels=labels, ignore_labels=ignore_labels or (),
            overrides=overrides, initial=start, weights=weights, progress=progress,
            config=FitConfig(max_iterations=iterations),
        )
    except (InputError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    info = result.info
    typer.echo(f"Dice of the re-simulated core {info['dice_core']:.3f}, edema {info['dice_edema']:.3f}; "
               f"sqrt(Dw T) = {info['scaled_parameters']['sqrt_dw_t_mm']:.2f} mm, "
               f"sqrt(rho T) = {info['scaled_parameters']['sqrt_rho_t']:.2f}")
    for path in paths:
        typer.echo(f"wrote {path}")


_RUN_HELP = {
    "labels": "Label convention of seg: brats2021, brats2023, brats2015, gliodil, tum.",
    "ignore_labels": "Label values to drop explicitly (repeatable).",
    "margin_mm": "Standard CTV margin from the tumour core, mm [default: 15].",
    "start": "Fit start: network or heuristic [default: network].",
    "iterations": "Refinement iterations at most [default: 150].",
    "config": "YAML mapping of these option names (labels, ignore_labels, margin_mm, start, "
              "iterations); command-line values win.",
}


def _run_options(config, **given):
    """Resolve --config and the command line into run_case keyword arguments."""
    from rtjax.pipeline import resolve_options

    options = resolve_options(config, **given)
    return {"labels": options["labels"], "ignore_labels": tuple(options["ignore_labels"]),
            "margin_mm": options["margin_mm"], "initial": options["start"],
            "fit_iterations": options["iterations"]}


@app.command()
def run(
    case_dir: Annotated[Path, typer.Argument(help="Case folder with seg (else t1c + flair, segmented), wm + gm (else the registered atlas) [brain_mask, recurrence, t1c, flair].")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (written via OUT.partial, then renamed).")],
    labels: Annotated[Optional[str], typer.Option("--labels", help=_RUN_HELP["labels"])] = None,
    ignore_labels: Annotated[Optional[list[int]], typer.Option("--ignore-labels", help=_RUN_HELP["ignore_labels"])] = None,
    margin_mm: Annotated[Optional[float], typer.Option("--margin-mm", help=_RUN_HELP["margin_mm"])] = None,
    start: Annotated[Optional[str], typer.Option("--start", help=_RUN_HELP["start"])] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help=_RUN_HELP["iterations"])] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help=_RUN_HELP["config"])] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """The whole pipeline for one case: segmentation (if no seg), atlas tissue (if no wm/gm),
    fit, density, standard and iso-volumetric model CTVs, recurrence coverage when a
    recurrence is given, and a report figure, all on the input grid."""
    from rtjax.errors import InputError
    from rtjax.pipeline import run_case

    try:
        options = _run_options(config, labels=labels, ignore_labels=ignore_labels,
                               margin_mm=margin_mm, start=start, iterations=iterations)
        summary = run_case(case_dir, out, progress=progress, **options)
    except (InputError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"standard CTV {summary['standard_volume_ml']:.1f} mL, model CTV "
               f"{summary['model_volume_ml']:.1f} mL (density >= {summary['cutoff']:.4g})")
    if summary["coverage"]:
        cov = summary["coverage"]
        typer.echo(f"recurrence coverage: standard {100 * cov['standard_coverage']:.1f} %, "
                   f"model {100 * cov['model_coverage']:.1f} %")
    for name in summary["outputs"]:
        typer.echo(f"wrote {out / name}")


@app.command()
def cohort(
    cohort_dir: Annotated[Path, typer.Argument(help="Folder of case folders (each as for `rtjax run`).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: one folder per case, summary.csv, errors.log, study figures.")],
    labels: Annotated[Optional[str], typer.Option("--labels", help=_RUN_HELP["labels"])] = None,
    ignore_labels: Annotated[Optional[list[int]], typer.Option("--ignore-labels", help=_RUN_HELP["ignore_labels"])] = None,
    margin_mm: Annotated[Optional[float], typer.Option("--margin-mm", help=_RUN_HELP["margin_mm"])] = None,
    start: Annotated[Optional[str], typer.Option("--start", help=_RUN_HELP["start"])] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help=_RUN_HELP["iterations"])] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help=_RUN_HELP["config"])] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: run only cases i (sorted, 0-based) with i % N == K-1, e.g. one cluster array job per shard.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Only 1: JAX already uses every core; parallelise with one process per --shard.")] = 1,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Run every case of a cohort: resumable (finished cases are skipped, interrupted ones
    redone), a failing case is logged and the others go on; summary.csv and, with >= 2
    recurrences, the coverage study at the end. Exit code 1 when some case failed."""
    from rtjax.errors import InputError
    from rtjax.pipeline import run_cohort

    try:
        options = _run_options(config, labels=labels, ignore_labels=ignore_labels,
                               margin_mm=margin_mm, start=start, iterations=iterations)
        result = run_cohort(cohort_dir, out, shard=shard, jobs=jobs, progress=progress, **options)
    except (InputError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"{len(result.processed) + len(result.skipped)} done "
               f"({len(result.processed)} run now, {len(result.skipped)} already done), "
               f"{len(result.failed)} failed")
    for case, message in result.failed:
        typer.secho(f"failed {case}: {message}", fg=typer.colors.RED, err=True)
    for path in result.files:
        typer.echo(f"wrote {path}")
    if result.failed:
        raise typer.Exit(code=1)


@app.command()
def benchmark(
    quick: Annotated[bool, typer.Option("--quick", help="Small grids, for a smoke run.")] = False,
    jax_steps: Annotated[int, typer.Option("--jax-steps", help="Time steps per JAX run.")] = 100,
    numpy_steps: Annotated[int, typer.Option("--numpy-steps", help="Time steps per NumPy run.")] = 5,
    batch: Annotated[int, typer.Option("--batch", help="Parameter sets in the vmapped run.")] = 16,
) -> None:
    """Print the FK solver's throughput beside a plain-NumPy version of the same scheme, and
    the anisotropic step beside the isotropic one."""
    import jax

    from rtjax.benchmark import benchmark_anisotropic_step, benchmark_solver, format_step_table, format_table
    from rtjax.data import DataNotFoundError, data_root

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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("rtjax_demo"),
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML overriding the demo patient (see configs/demo.yaml).")] = None,
) -> None:
    """The whole pipeline on a built-in synthetic patient grown in the MNI152 atlas: tumour,
    recurrence after resection, fit, standard and model CTVs, coverage (CPU, a minute or two)."""
    from rtjax.demo import demo_summary, load_patient_config, run_demo

    try:
        patient = load_patient_config(config) if config else None
    except (ValueError, OSError) as err:
        _fail(str(err))
    for path in run_demo(out, patient):
        typer.echo(f"wrote {path}")
    typer.echo(demo_summary(out))


@app.command()
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
    from rtjax.errors import InputError

    try:
        result = case_tissue(case_dir, out, deformable=deformable, log=typer.echo)
    except (InputError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"tissue from the {result.info['source']}; tumour masked from the cost: "
               f"{result.info['tumour_masked']}")
    for name in ("wm.nii.gz", "gm.nii.gz", "csf.nii.gz", "brain_mask.nii.gz", "tissue.png", "tissue.json"):
        typer.echo(f"wrote {out / name}")


@app.command("train-seg")
def train_seg(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/seg_cpu.yaml.")],
    workdir: Annotated[Path, typer.Option("--workdir", help="Checkpoints, bank, leave-one-out results, weights/.")],
    max_seconds: Annotated[Optional[float], typer.Option("--max-seconds", help="Wall-clock budget, s (overrides train.max_seconds).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Real-data root with brats2015/ and tcga/ (overrides data.root).")] = None,
) -> None:
    """Train the segmentation ensemble: FK tumour bank, synthetic base model, leave-one-out
    fine-tunes scored on the real cases, final fine-tune; resumes from WORKDIR's checkpoints
    and writes WORKDIR/weights (the shipped layout)."""
    import dataclasses

    from rtjax.seg.config import load_config
    from rtjax.seg.train import train_and_evaluate

    try:
        cfg = load_config(config)
    except (ValueError, OSError) as err:
        _fail(str(err))
    if data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data)))
    result = train_and_evaluate(cfg, workdir, max_seconds=max_seconds)
    typer.echo(f"wrote {result['weights']}")


@app.command()
def segment(
    case_dir: Annotated[Path, typer.Argument(help="Case folder with t1c and flair (BraTS 2021/2023 names accepted).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    labels: Annotated[str, typer.Option("--labels", help="Output label convention: brats2021 (4 = ET) or brats2023 (3 = ET).")] = "brats2021",
    uncertainty: Annotated[bool, typer.Option("--uncertainty/--no-uncertainty", help="Flip TTA + ensemble spread; writes segmentation_uncertainty.nii.gz.")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Weights folder (default: the shipped rtjax/weights/seg).")] = None,
) -> None:
    """Segment necrosis, enhancing tumour and edema from T1c + FLAIR; writes
    segmentation.nii.gz (uint8, on the input grid) and volumes in mL."""
    from rtjax.errors import InputError
    from rtjax.labels import get_convention, split_labels
    from rtjax.seg.infer import segment_case, write_segmentation

    if labels.lower() not in ("brats2021", "brats2023"):
        _fail(f"--labels must be brats2021 or brats2023, got {labels!r}")
    try:
        label_array, unc, ref = segment_case(case_dir, weights=weights, labels=labels, uncertainty=uncertainty)
        paths = write_segmentation(out, label_array, unc, ref)
    except (InputError, FileNotFoundError) as err:
        _fail(str(err))
    masks = split_labels(label_array, get_convention(labels))
    ml = ref.voxel_volume_ml
    for path in paths:
        typer.echo(f"wrote {path}")
    typer.echo(f"volumes (mL): necrosis {masks.necrosis.sum() * ml:.1f}, enhancing {masks.enhancing.sum() * ml:.1f}, "
               f"edema {masks.edema.sum() * ml:.1f}, whole tumour {masks.whole.sum() * ml:.1f}")


@app.command()
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
