"""report.html from small synthetic inputs: the headline numbers, options and verdict at the top,
valid pictures that fit the page with figure text of at least 10 px on screen, heatmap rows grouped
by role, and, where a Chromium is installed, no horizontal overflow at 1400 and 900 px."""

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from qexport.verification import report_plots as plots
from qexport.verification.report import CONTENT_PX, role_table, write_report
from qexport.verification.report_summary import mean_se

STEPS = 4
NARROW_CONTENT_PX = 900 - 2 * 20 - 17  # the content column at a 900 px viewport, less a classic scrollbar


def _inputs(video=True):
    rng = np.random.default_rng(0)
    shape = (16, 32, 32, 3) if video else (48, 48, 3)
    fp = rng.integers(0, 256, shape, dtype=np.uint8)
    quantized = np.clip(fp.astype(int) + rng.integers(-8, 9, shape), 0, 255).astype(np.uint8)
    build = {"psnr_db": 30.12, "psnr_se_db": 0.25, "psnr_samples": [29.9, 30.3], "ssim": 0.914,
             "ssim_samples": [0.90, 0.92, 0.922], "adherence": 0.875, "temporal_consistency": 0.81,
             "step_sqnr_db": [31.0, 30.0, 29.5, 29.0], "model_mib": 19.5, "step_ms": 12.0}  # fmt: skip
    result = {"model_id": "tiny-latte", "prompts": ["a red circle moving left"], "seeds": [0, 1],
              "fp": {"adherence": 0.993, "psnr_db": None}, "builds": {"/x/out": build}}  # fmt: skip
    recipe = {"version": 1, "techniques": [{"_type": "smoothquant", "mode": "tsq", "alpha": "auto"},
                                           {"_type": "channel_shift"}]}  # fmt: skip
    model = {"model": "step_00.onnx", "steps": [0], "integer": 64, "emulated": 0, "float": [], "ok": True,
             "cosine_sim": 0.99997, "max_lsb_sim": 2.5, "lsb_bound": 7.7, "sqnr_fp_db": 41.3}  # fmt: skip
    verification = {"ok": True, "runtime": "onnxruntime", "cosine_floor": 0.999, "models": [model] * 4,
                    "end_to_end": {"psnr_db": 26.5, "ssim": 0.88}}  # fmt: skip
    quantization = {"w_bits": 8, "a_bits": 8, "weights": "int8 per output channel, symmetric",
                    "activations": "uint8 per tensor, asymmetric, static", "smooth": "tsq", "alpha": 0.5,
                    "granularity": "timestep-wise", "weight_rounding": "nearest", "weight_clip": "minmax",
                    "layers": 6, "kept_fp": ["proj_out"]}  # fmt: skip
    manifest = {"recipe": recipe, "target": "ort-cpu", "ranges": [{}] * 4, "steps": [{}] * STEPS, "cfg": 7.0,
                "quantization": quantization, "verification": verification}  # fmt: skip
    layers = [f"{kind}blocks.{b}.{r}" for kind in ("transformer_", "temporal_transformer_") for b in range(2)
              for r in ("attn1.to_q", "attn1.to_v", "ff.net.2")]  # fmt: skip
    table = rng.uniform(20, 40, (len(layers), STEPS))
    table[1::3] = np.nan  # folded value projections
    return result, {"FP": fp, "/x/out": quantized}, {"/x/out": manifest}, {"/x/out": (layers, table)}


def _page(tmp_path, video=True, **changes):
    result, samples, manifests, heat = _inputs(video)
    manifests["/x/out"].update(changes)
    write_report(tmp_path / "r.html", result, samples, manifests, None, heat)
    return (tmp_path / "r.html").read_text()


def _images(page):
    tags = re.findall(r"<img[^>]*>", page)
    assert tags
    for tag in tags:
        kind, data = re.search(r"src='data:image/(png|gif);base64,([A-Za-z0-9+/=]+)'", tag).groups()
        yield kind, Image.open(io.BytesIO(base64.b64decode(data))), tag


@pytest.mark.parametrize("video", [True, False])
def test_the_top_gives_numbers_options_target_and_verdict(tmp_path, video):
    page = _page(tmp_path, video)
    top = page[: page.index("<h2>Per-step error")]
    assert top.index("<h1>qexport report: tiny-latte") < top.index("Headline numbers") < top.index("Build out")
    assert "30.12 ± 0.25" in top  # PSNR ± its recorded s.e.
    assert f"0.914 ± {np.std([0.90, 0.92, 0.922], ddof=1) / np.sqrt(3):.3f}" in top  # SSIM, s.e. from the samples
    assert "0.875 ± -" in top and "0.993 ± -" in top  # adherence of the build and of FP: no s.e. recorded
    assert "Target</b> ort-cpu, 4 model(s) over 4 steps" in top and "W8A8" in top and "smoothing tsq" in top
    assert "weights int8 per output channel, symmetric" in top and "6 quantized linears, 1 kept in FP" in top
    assert "techniques channel_shift;" in top  # the recipe's techniques besides the smoothing
    assert "class='verdict pass'>PASS</span> 4 model(s) verified on onnxruntime" in top
    assert "<td>4 of 4</td>" in top and "<td>256 / 0 / 0</td>" in top and "<td>0.999970 (0.999)</td>" in top
    assert "<td>2.50 (7.70)</td>" in top and "<td>41.3 dB</td>" in top and "PSNR 26.50 dB, SSIM 0.880" in top
    assert "mode: tsq" in top and "alpha: auto" in top  # the recipe, folded
    assert page.count("How to read this.") == 5  # headline, builds, per-step, heatmap, frames


def test_a_failing_or_missing_verification_says_so(tmp_path):
    _, _, manifests, _ = _inputs()
    failing = dict(manifests["/x/out"]["verification"])
    failing["ok"] = False
    failing["models"] = [*failing["models"][:3], {**failing["models"][0], "model": "step_03.onnx", "ok": False}]
    page = _page(tmp_path, verification=failing)
    assert "class='verdict fail'>FAIL" in page and "3 of 4 (failing: step_03.onnx)" in page
    assert "NOT VERIFIED" in _page(tmp_path, verification=None)


def test_standard_errors_come_from_the_record_else_the_samples_else_a_dash():
    scores = {"a": 1.0, "a_se": 0.5, "a_samples": [1.0, 2.0], "b": 2.0, "b_samples": [1.0, 3.0], "c": 3.0}
    assert mean_se(scores, "a", "a_se", "a_samples") == (1.0, 0.5)
    assert mean_se(scores, "b", "b_se", "b_samples") == (2.0, pytest.approx(1.0))
    assert mean_se(scores, "c", "c_se", "c_samples") == (3.0, None)


@pytest.mark.parametrize("video", [True, False])
def test_every_picture_is_valid_and_fits_the_page(tmp_path, video):
    page = _page(tmp_path, video)
    assert "img{max-width:100%;height:auto" in page and f"max-width:{CONTENT_PX + 40}px" in page
    assert "*{box-sizing:border-box}" in page and plots.PAGE_PX <= NARROW_CONTENT_PX
    images = list(_images(page))
    for kind, image, tag in images:
        assert image.format == kind.upper(), (image.format, kind)
        assert f"width='{image.width}'" in tag and f"height='{image.height}'" in tag
        assert image.width <= plots.PAGE_PX, (tag[:60], image.size)
    gifs = [image for kind, image, _ in images if kind == "gif"]
    assert len(gifs) == (1 if video else 0)
    if video:
        assert gifs[0].n_frames == 16  # every frame of the clip, FP beside the build
        assert "frames 0, 2, 4, 6, 9, 11, 13, 15 of 16" in page
    else:  # one image per row, FP / quantized / difference, enlarged but not to the page width
        frames = [image for kind, image, tag in images if "class='px'" in tag]
        assert len(frames) == 3 and all(f.size == (288, 288) for f in frames)
    assert f"× {plots.DIFF_GAIN} (black = identical)" in page


def test_figure_text_is_at_least_ten_pixels_at_the_displayed_size(tmp_path):
    long = {f"temporal_transformer_blocks.{i}.attn1.to_q, to_k, to_v": [1.0, 2.0, 4.0] for i in range(6)}
    table = np.array([[30.0, 31.0], [np.nan, np.nan]])
    figures = [plots.line_figure(long, "step", "max |x|", "ranges", log=True),
               plots.heatmap_figure(["attn1.to_q", "attn1.to_v"], table, "title", "folded")]  # fmt: skip
    for fig in figures:
        assert plots.smallest_font_pt(fig) >= plots.FONT_PT
        picture = plots.render(fig)
        assert picture.width == plots.FIG_WIDTH_IN * plots.DPI <= plots.PAGE_PX  # a long legend does not widen it
        assert plots.displayed_text_px(plots.FONT_PT, picture.width, NARROW_CONTENT_PX) >= plots.MIN_TEXT_PX
    assert plots.displayed_text_px(plots.FONT_PT, 1600, 800) < plots.MIN_TEXT_PX  # the check can fail
    declared = [float(x) for x in re.findall(r"data-text-px='([\d.]+)'", _page(tmp_path))]
    assert len(declared) == 2 and min(declared) >= plots.MIN_TEXT_PX  # per-step plot and heatmap


def test_heatmap_rows_are_grouped_by_role_and_folded_rows_stay_grey():
    _, _, _, heat = _inputs()
    layers, table = heat["/x/out"]
    roles, means = role_table(layers, table)
    assert roles == ["attn1.to_q", "attn1.to_v", "ff.net.2", "temporal attn1.to_q", "temporal attn1.to_v",
                     "temporal ff.net.2"]  # fmt: skip
    np.testing.assert_allclose(means[0], table[[0, 3]].mean(axis=0))
    assert np.isnan(means[1]).all() and np.isnan(means[4]).all() and np.isfinite(means[[0, 2, 3, 5]]).all()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
MEASURE = """<script>window.onload=()=>{const d=document.documentElement;
const fonts=[...document.querySelectorAll('body *')].filter(e=>[...e.childNodes].some(n=>n.nodeType===3
&&n.textContent.trim())).map(e=>parseFloat(getComputedStyle(e).fontSize));
const figures=[...document.querySelectorAll('img[data-text-px]')].map(i=>i.dataset.textPx*i.clientWidth/i.naturalWidth);
document.title='W'+d.scrollWidth+'x'+window.innerWidth+'x'+Math.min(...fonts)+'x'+Math.min(...figures)}</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("width", [1400, 900])
def test_chromium_renders_without_horizontal_overflow(tmp_path, width):
    page = tmp_path / "r.html"
    page.write_text(_page(tmp_path).replace("</main>", MEASURE + "</main>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             f"--window-size={width},1000", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]  # fmt: skip
    dom = subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<title>W(\d+)x(\d+)x([\d.]+)x([\d.]+)</title>", dom)
    assert found, dom[:500]
    scroll, inner, smallest_font, figure_text = int(found[1]), int(found[2]), float(found[3]), float(found[4])
    assert scroll <= inner == width, (scroll, inner)
    assert smallest_font >= 10 and figure_text >= plots.MIN_TEXT_PX, (smallest_font, figure_text)
