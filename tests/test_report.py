"""report.html from small synthetic inputs: the headline numbers, the verdict and the recipe at the
top, pictures that fit the page with text of at least 10 px, grouped heatmap rows, and, where a
Chromium is installed, no horizontal overflow at 1400 and 900 px."""

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from qexport.exporter import report_plots
from qexport.exporter.report import CONTENT_PX, role_table, write_report

STEPS = 4


def _inputs(video=True):
    rng = np.random.default_rng(0)
    shape = (16, 32, 32, 3) if video else (64, 64, 3)
    fp = rng.integers(0, 256, shape, dtype=np.uint8)
    quantized = np.clip(fp.astype(int) + rng.integers(-8, 9, shape), 0, 255).astype(np.uint8)
    build = {"psnr_db": 30.12, "psnr_se_db": 0.25, "psnr_samples": [29.9, 30.3], "ssim": 0.914, "adherence": 1.0,
             "step_sqnr_db": [31.0, 30.0, 29.5, 29.0], "model_mib": 19.5, "step_ms": 12.0}  # fmt: skip
    result = {"model_id": "tiny-latte", "prompts": ["a red circle moving left"], "seeds": [0, 1],
              "fp": {"adherence": 0.993}, "builds": {"/x/out": build}}  # fmt: skip
    recipe = {"version": 1, "techniques": [{"_type": "smoothquant", "mode": "tsq", "alpha": "auto"}]}
    verification = {"ok": True, "runtime": "onnxruntime", "models": [{"integer": 64}] * 4,
                    "end_to_end": {"psnr_db": 26.5}}  # fmt: skip
    manifest = {"recipe": recipe, "target": "ort-cpu", "ranges": [{}] * 4, "verification": verification}
    layers = [f"transformer_blocks.{b}.{r}" for b in range(2) for r in ("attn1.to_q", "attn1.to_v", "ff.net.2")]
    table = rng.uniform(20, 40, (len(layers), STEPS))
    table[[1, 4]] = np.nan  # folded value projections
    return result, {"FP": fp, "/x/out": quantized}, {"/x/out": manifest}, {"/x/out": (layers, table)}


def _images(page):
    for kind, data, width in re.findall(r"data:image/(png|gif);base64,([A-Za-z0-9+/=]+)' width='(\d+)'", page):
        yield kind, Image.open(io.BytesIO(base64.b64decode(data))), int(width)


@pytest.mark.parametrize("video", [True, False])
def test_the_page_leads_with_verdict_recipe_and_numbers_and_every_picture_fits(tmp_path, video):
    result, samples, manifests, heat = _inputs(video)
    write_report(tmp_path / "r.html", result, samples, manifests, None, heat)
    page = (tmp_path / "r.html").read_text()
    top = page[: page.index("<h2>Per-step error")]
    assert "class='verdict pass'>PASS" in top and "4 model(s) verified" in top and "end to end PSNR 26.50" in top
    assert "mode: tsq" in top and "alpha: auto" in top and "target ort-cpu" in top
    assert "30.12 ± 0.25" in top and "0.914" in top and "adherence (FP 0.993)" in top
    assert page.count("How to read this.") == 5
    images = list(_images(page))
    assert sum(kind == "gif" for kind, _, _ in images) == (1 if video else 0)
    for _, image, width in images:
        assert image.width == width <= report_plots.PAGE_PX < CONTENT_PX, (image.size, width)
    assert "max-width:100%" in page and f"max-width:{CONTENT_PX}px" in page
    if video:
        gif = next(image for kind, image, _ in images if kind == "gif")
        assert gif.n_frames == 16  # every frame of the clip, FP beside the build


def test_figure_text_is_at_least_ten_pixels_on_screen():
    assert report_plots.text_px(report_plots.FONT_PT) >= report_plots.MIN_TEXT_PX
    style = report_plots._style()
    assert min(style.values()) >= report_plots.FONT_PT
    # a figure is shown at its natural width (it is narrower than the page), so points map to pixels 1:1
    _, width = report_plots.line_plot({"a": [1.0, 2.0]}, "x", "y", "t")
    assert width <= report_plots.PAGE_PX


def test_heatmap_rows_are_grouped_by_role_and_folded_rows_stay_grey():
    _, _, _, heat = _inputs()
    layers, table = heat["/x/out"]
    roles, means = role_table(layers, table)
    assert roles == ["attn1.to_q", "attn1.to_v", "ff.net.2"]
    np.testing.assert_allclose(means[0], table[[0, 3]].mean(axis=0))
    assert np.isnan(means[1]).all() and np.isfinite(means[2]).all()


def test_an_unverified_build_says_so(tmp_path):
    result, samples, manifests, _ = _inputs()
    manifests["/x/out"] = {**manifests["/x/out"], "verification": None}
    write_report(tmp_path / "r.html", result, samples, manifests)
    assert "NOT VERIFIED" in (tmp_path / "r.html").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MEASURE = """<script>window.onload=()=>{const d=document.documentElement;document.title=
'W'+d.scrollWidth+'x'+window.innerWidth+'x'+Math.min(...[...document.querySelectorAll('body *')]
.filter(e=>e.childNodes.length&&[...e.childNodes].some(n=>n.nodeType===3&&n.textContent.trim()))
.map(e=>parseFloat(getComputedStyle(e).fontSize)))}</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("width", [1400, 900])
def test_chromium_renders_without_horizontal_overflow(tmp_path, width):
    result, samples, manifests, heat = _inputs()
    write_report(tmp_path / "r.html", result, samples, manifests, None, heat)
    page = tmp_path / "r.html"
    page.write_text(page.read_text().replace("</main>", MEASURE + "</main>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             f"--window-size={width},1000", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]  # fmt: skip
    dom = subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<title>W(\d+)x(\d+)x([\d.]+)</title>", dom)
    assert found, dom[:500]
    scroll, inner, smallest_font = int(found[1]), int(found[2]), float(found[3])
    assert scroll <= inner == width and smallest_font >= 10, (scroll, inner, smallest_font)
