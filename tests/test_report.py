"""The case report: slice geometry, the figure's content and the HTML page."""

from __future__ import annotations

import base64
import html.parser
import re

import numpy as np
import pytest

from rtjax import provenance, report
from rtjax.errors import InputError
from rtjax.io import Image

SHAPE = (24, 28, 20)
SPACING = (1.0, 1.5, 2.0)
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = (-12.0, -20.0, 5.0)


def _ball(centre, radius_mm, shape=SHAPE, spacing=SPACING):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre_mm = np.asarray(centre) * np.asarray(spacing)
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm)) <= radius_mm**2


def _case():
    rng = np.random.default_rng(0)
    head = _ball((12, 14, 10), 16.0)
    background = np.where(head, 1.0 + 0.1 * rng.standard_normal(SHAPE), 0.02 * rng.random(SHAPE))
    core = _ball((10, 15, 11), 3.0)
    edema = _ball((10, 15, 11), 5.0) & ~core
    standard = _ball((10, 15, 11), 8.0) & head
    model = _ball((11, 15, 11), 7.5) & head
    cutoff = _ball((10, 14, 11), 9.5) & head
    recurrence = _ball((12, 16, 11), 2.5)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(
        np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij"),
        np.array((10, 15, 11)) * SPACING)))
    density = np.clip(np.exp(-dist / 5.0), 0, 1).astype(np.float32)
    ctvs = {"CTV standard 15 mm": standard, "CTV model (iso-volumetric)": model,
            "CTV c >= 0.01": cutoff}
    volumes = report.mask_volumes_ml({"core": core, "edema": edema, **ctvs,
                                      "recurrence": recurrence}, AFFINE)
    coverage = {"CTV standard 15 mm": 0.9876, "CTV model (iso-volumetric)": 1.0,
                "CTV c >= 0.01": 0.5}
    return {"background": background, "background_name": "registered atlas", "affine": AFFINE,
            "density": density, "core": core, "edema": edema, "ctvs": ctvs,
            "recurrence": recurrence, "volumes_ml": volumes, "coverage": coverage,
            "title": "case-7"}


@pytest.fixture(scope="module")
def case():
    return _case()


@pytest.fixture(scope="module")
def figure(case):
    fig = report.build_case_figure(**case)
    fig.canvas.draw()
    yield fig
    report.headless_pyplot().close(fig)


def _axes(fig, gid):
    (ax,) = [a for a in fig.axes if a.get_gid() == gid]
    return ax


def _texts(fig):
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text)]


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("convention", report.CONVENTIONS)
@pytest.mark.parametrize("view", list(report.VIEWS))
def test_display_slice_puts_each_extreme_at_its_letter(view, convention):
    normal, row, col = report.VIEWS[view]
    shape = (5, 6, 7)
    letters = report.orientation_letters(view, convention)
    index_along = [np.broadcast_to(np.arange(n).reshape([-1 if a == axis else 1 for a in range(3)]),
                                   shape) for axis, n in enumerate(shape)]
    cut = {axis: report.display_slice(index_along[axis], view, 2, convention) for axis in range(3)}
    assert cut[normal].shape == (shape[row], shape[col])
    assert (cut[normal] == 2).all()
    positive = "RAS"
    # The edge named by a positive letter (R, A, S) holds the highest index along that axis.
    top = shape[row] - 1 if letters["top"] in positive else 0
    assert (cut[row][0, :] == top).all() and letters["top"] == positive[row]
    left = shape[col] - 1 if letters["left"] in positive else 0
    assert (cut[col][:, 0] == left).all()
    assert {letters["left"], letters["right"]} == {positive[col], "LPI"[col]}


def test_orientation_letters_follow_the_conventions():
    rad = {v: report.orientation_letters(v, "radiological") for v in report.VIEWS}
    neu = {v: report.orientation_letters(v, "neurological") for v in report.VIEWS}
    assert rad["axial"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert rad["coronal"] == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert rad["sagittal"] == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    assert neu["axial"] == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    assert neu["coronal"]["left"] == "L" and neu["sagittal"] == rad["sagittal"]
    with pytest.raises(ValueError, match="convention"):
        report.orientation_letters("axial", "upside-down")
    with pytest.raises(ValueError, match="view"):
        report.display_slice(np.zeros((2, 2, 2)), "oblique", 0)


def test_patient_right_anterior_lands_top_left_of_a_radiological_axial_slice():
    """An LPS file (BraTS-like affine): a voxel at the patient's right-anterior corner comes
    out at the top left of the axial slice through it, after the reorientation to RAS."""
    data = np.zeros((8, 9, 4))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = (0.0, 8.0, 0.0)
    # In LPS index space, right = low i, anterior = low j.
    data[0, 0, 2] = 1.0
    image = Image.from_array(data, lps)
    ijk = tuple(int(v) for v in np.argwhere(image.data == 1)[0])
    world = report.slice_position_mm(image.affine, ijk)
    np.testing.assert_allclose(world, lps[:3, :3] @ (0, 0, 2) + lps[:3, 3])
    axial = report.display_slice(image.data, "axial", ijk[2], "radiological")
    assert axial[0, 0] == 1.0 and axial.sum() == 1.0
    neurological = report.display_slice(image.data, "axial", ijk[2], "neurological")
    assert neurological[0, -1] == 1.0


def test_core_centre_is_a_core_voxel_nearest_the_centre_of_mass():
    crescent = _ball((12, 14, 10), 6.0) & ~_ball((12, 16, 10), 5.0)
    com = np.argwhere(crescent).mean(axis=0)
    centre = report.core_centre(crescent)
    assert crescent[centre]
    distances = ((np.argwhere(crescent) - com) ** 2).sum(axis=1)
    assert ((np.asarray(centre) - com) ** 2).sum() == pytest.approx(distances.min())
    two = np.zeros(SHAPE, bool)
    two[2:4, 2:4, 2:4] = two[18:21, 20:23, 14:17] = True
    assert two[report.core_centre(two)]
    with pytest.raises(ValueError, match="empty"):
        report.core_centre(np.zeros(SHAPE, bool))


def test_positions_volumes_and_obliqueness_from_the_affine():
    assert report.slice_position_mm(AFFINE, (2, 4, 3)) == (-10.0, -14.0, 11.0)
    mask = np.zeros(SHAPE, bool)
    mask.flat[:10] = True
    assert report.mask_volumes_ml({"m": mask}, AFFINE) == {"m": pytest.approx(10 * 3.0 / 1000)}
    assert not report.is_oblique(AFFINE)
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    oblique = AFFINE.copy()
    oblique[:3, :3] = rotation @ AFFINE[:3, :3]
    assert report.is_oblique(oblique)


def test_background_image_prefers_mri_and_names_atlas_tissue():
    wm, gm, t1c = np.ones(SHAPE), np.full(SHAPE, 0.4), np.full(SHAPE, 7.0)
    image, name = report.background_image({"t1c": t1c, "wm": wm, "gm": gm}, atlas_tissue=True)
    assert name == "T1c" and (image == 7.0).all()
    image, name = report.background_image({"wm": wm, "gm": gm}, atlas_tissue=True)
    assert name == "registered atlas" and np.allclose(image, 1.2)
    assert report.background_image({"wm": wm, "gm": gm}, atlas_tissue=False)[1] == "tissue map"
    with pytest.raises(ValueError, match="no background"):
        report.background_image({"wm": wm}, atlas_tissue=False)


# --------------------------------------------------------------------------- figure


def test_panels_name_the_background_and_the_slice_position(figure, case):
    centre = report.core_centre(case["core"])
    world = report.slice_position_mm(AFFINE, centre)
    for view, (normal, _, _) in report.VIEWS.items():
        for what in ("structures", "density"):
            title = _axes(figure, f"{what}-{view}").get_title()
            assert "background: registered atlas" in title
            assert f"{'xyz'[normal]} = {world[normal]:+.1f} mm" in title


def test_panels_have_letters_physical_aspect_and_a_1_cm_bar(figure):
    for view, (_, row, col) in report.VIEWS.items():
        for what in ("structures", "density"):
            ax = _axes(figure, f"{what}-{view}")
            letters = {t.get_gid().split("-")[1]: t.get_text() for t in ax.texts
                       if (t.get_gid() or "").startswith("orientation-")}
            assert letters == report.orientation_letters(view)
            (image,) = ax.images
            rows, cols = image.get_array().shape
            np.testing.assert_allclose(image.get_extent(),
                                       (0, cols * SPACING[col], rows * SPACING[row], 0))
            (bar,) = ax.findobj(lambda a: a.get_gid() == "scale-bar")
            rect = bar.size_bar.get_children()[0]
            width_px = rect.get_window_extent().width
            ten_mm = np.diff(ax.transData.transform([(0, 0), (10, 0)])[:, 0])[0]
            assert width_px == pytest.approx(abs(ten_mm), abs=0.5)
            assert "1 cm" in _texts(bar)


def test_core_is_drawn_last_and_thickest(figure):
    for view in report.VIEWS:
        ax = _axes(figure, f"structures-{view}")
        outlines = [c for c in ax.collections if c.get_gid() in
                    {"core", "edema", "recurrence", "ctv-0", "ctv-1", "ctv-2"}]
        assert {c.get_gid() for c in outlines} >= {"core", "edema", "ctv-0", "ctv-1", "ctv-2"}
        core = next(c for c in outlines if c.get_gid() == "core")
        others = [c for c in outlines if c is not core]
        assert core.get_zorder() > max(c.get_zorder() for c in others)
        assert min(core.get_linewidths()) > max(max(c.get_linewidths()) for c in others)
        density_ax = _axes(figure, f"density-{view}")
        assert [c.get_gid() for c in density_ax.collections].count("core") == 1


def test_ctvs_are_told_apart_in_the_legend(figure, case):
    (legend,) = figure.findobj(lambda a: a.get_gid() == "legend")
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["core (GTV)", "edema", *case["ctvs"], "recurrence"]
    ctv_lines = legend.legend_handles[2:2 + len(case["ctvs"])]
    styles = {(line.get_color(), str(line.get_linestyle())) for line in ctv_lines}
    assert len({c for c, _ in styles}) == len(case["ctvs"])
    assert len({s for _, s in styles}) == len(case["ctvs"])
    # The legend sits outside every image panel.
    legend_box = legend.get_window_extent()
    for ax in figure.axes:
        if (ax.get_gid() or "").startswith(("structures-", "density-")):
            assert not legend_box.overlaps(ax.get_window_extent())


def test_density_scale_is_one_colour_map_with_labelled_levels(figure):
    (bar_ax,) = figure.findobj(lambda a: a.get_gid() == "density-colourbar")
    labels = [t.get_text() for t in bar_ax.get_yticklabels()]
    assert labels == ["0.01", "0.1", "0.3", "0.6", "1"]
    for view in report.VIEWS:
        ax = _axes(figure, f"density-{view}")
        (wash,) = [c for c in ax.collections if c.get_gid() == "density"]
        np.testing.assert_allclose(wash.levels, (0.01, 0.1, 0.3, 0.6, 1.0))


def test_text_strip_gives_volumes_and_coverage(figure, case):
    (strip,) = [t for t in _texts(figure) if t.startswith("structure")]
    for name, volume in case["volumes_ml"].items():
        assert re.search(rf"{re.escape(name)}\s+{volume:.1f} mL", strip), name
    assert re.search(r"CTV standard 15 mm\s+\S+ mL\s+98\.8 %", strip)
    assert re.search(r"CTV c >= 0\.01\s+\S+ mL\s+50\.0 %", strip)
    (footer,) = [t for t in _texts(figure) if t.startswith("Radiological display")]
    assert "patient's right on the image left" in footer and "Oblique" not in footer
    assert "Background: registered atlas" in footer


def test_figure_without_recurrence_says_coverage_unknown_and_flags_oblique(case):
    oblique = case["affine"].copy()
    angle = np.deg2rad(8)
    oblique[:3, :3] = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                                [0, np.sin(angle), np.cos(angle)]]) @ oblique[:3, :3]
    given = {**case, "affine": oblique, "recurrence": None, "coverage": None,
             "convention": "neurological"}
    fig = report.build_case_figure(**given)
    try:
        texts = _texts(fig)
        assert any("recurrence coverage: not known" in t for t in texts)
        assert not any(re.search(r"\d %", t) for t in texts)
        (footer,) = [t for t in texts if t.startswith("Neurological display")]
        assert "Oblique image grid" in footer
        assert _axes(fig, "structures-axial").texts[0].get_text() in "LR"
    finally:
        report.headless_pyplot().close(fig)


def test_case_figure_writes_a_png_atomically(tmp_path, case):
    from matplotlib.image import imread

    path = report.case_figure(tmp_path / "report.png", **case)
    pixels = imread(path)
    assert pixels.shape[:2] == (1100, 1760)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "edema": c["edema"][:-1]}, "edema: shape"),
    (lambda c: {**c, "core": np.zeros(SHAPE, bool)}, "core is empty"),
    (lambda c: {**c, "coverage": {"CTV elsewhere": 0.5}}, "not a CTV with a volume"),
    (lambda c: {**c, "coverage": {"CTV standard 15 mm": 1.2}}, r"fraction in \[0, 1\]"),
    (lambda c: {**c, "ctvs": {f"CTV {n}": c["core"] for n in range(7)}}, "at most 6"),
    (lambda c: {**c, "density_levels": (0.3, 0.1)}, "density_levels"),
    (lambda c: {**c, "affine": np.zeros((4, 4))}, "affine"),
])
def test_bad_figure_inputs_raise_and_write_nothing(tmp_path, case, change, message):
    with pytest.raises(ValueError, match=message):
        report.case_figure(tmp_path / "report.png", **change(case))
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- HTML


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def png(tmp_path_factory, case):
    return report.case_figure(tmp_path_factory.mktemp("fig") / "report.png", **case).read_bytes()


def _html_args(case, png):
    return {
        "case_id": "case <7> & co", "figure_png": png, "volumes_ml": case["volumes_ml"],
        "coverage": case["coverage"],
        "fit_quality": {"dice_core": 0.61234567, "dice_edema": 0.13, "quality": "poor",
                        "reasons": ["core Dice 0.61 < 0.7", "edema Dice 0.13 < 0.7"]},
        "warnings": ["tissue: MNI152 atlas registered to the case, not the patient's own",
                     "segmentation by the network <script>alert(1)</script>"],
        "parameters": {"fit": {"sqrt_dw_t_mm": 5.731053352355957, "u_t1": 0.75},
                       "options": {"margin_mm": 15.0, "ignore_labels": []}},
        "provenance": {"rtjax_version": "0.1.0", "git_revision": "abc123",
                       "created": "2026-01-01T00:00:00+00:00",
                       "inputs": {"seg": "/data/c/seg.nii.gz"}},
    }


def test_html_report_is_self_contained_and_holds_the_numbers(tmp_path, case, png):
    path = report.case_report_html(tmp_path / "report.html", **_html_args(case, png))
    text = path.read_text()
    page = _Page()
    page.feed(text)
    (img,) = page.images
    assert img["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(img["src"].split(",", 1)[1]) == png
    assert not re.search(r"https?://|<link|<script|@import|url\(", text)
    assert "script" not in page.tags
    body = " ".join(page.text)
    assert "case <7> & co" in body and "<script>alert(1)</script>" in body
    assert "&lt;script&gt;" in text
    for name, volume in case["volumes_ml"].items():
        assert re.search(rf"{re.escape(name)}</td><td class=\"num\">{volume:.1f}</td>",
                         text.replace("&gt;", ">")), name
    assert "98.8 %" in body and "100.0 %" in body and "50.0 %" in body
    assert "poor" in body and "core Dice 0.61 < 0.7" in body
    assert "Dice, re-simulated vs observed core" in body and "0.6123" in body
    assert "fit.sqrt_dw_t_mm" in body and "5.731" in body and "5.731053" not in body
    assert "options.ignore_labels" in body and "none" in body
    assert "Warnings (2)" in body and "abc123" in body and "/data/c/seg.nii.gz" in body


def test_html_report_without_recurrence_or_warnings(tmp_path, case, png):
    args = {**_html_args(case, png), "coverage": None, "warnings": []}
    body = report.report_html(**args)
    assert "No warnings." in body and "not known (no recurrence given)" in body
    assert " %" not in body


def test_html_report_refuses_a_non_png_and_keeps_the_old_page(tmp_path, case, png):
    path = tmp_path / "report.html"
    report.case_report_html(path, **_html_args(case, png))
    before = path.read_bytes()
    bad = tmp_path / "figure.png"
    bad.write_bytes(b"GIF89a not a png")
    with pytest.raises(InputError, match="not a PNG") as err:
        report.case_report_html(path, **{**_html_args(case, png), "figure_png": bad})
    assert err.value.path == bad
    with pytest.raises(InputError, match="cannot read"):
        report.case_report_html(path, **{**_html_args(case, png),
                                         "figure_png": tmp_path / "nope.png"})
    with pytest.raises(ValueError, match="fraction"):
        report.case_report_html(path, **{**_html_args(case, png), "coverage": {"core": 2.0}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "report.html"]


def test_html_report_write_is_atomic(tmp_path, case, png, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provenance.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        report.case_report_html(path, **_html_args(case, png))
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
