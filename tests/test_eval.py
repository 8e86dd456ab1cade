"""qexport eval and report.html on a short (4-step) build of the built-in tiny-latte."""

import json
import re

import numpy as np
import pytest
from qexport.calib.store import load
from qexport.exporter.build import BuildConfig, build
from qexport.verification.evaluate import evaluate, layer_step_sqnr, write_json
from qexport.verification.report import write_report

from qexport.errors import QexportError
from qexport.recipe import recipe_of
from qexport.summaries import eval_table


@pytest.fixture(scope="module")
def two_builds(latte_stats, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tsq = build(latte_stats, root / "tsq", BuildConfig(recipe=recipe_of("smoothquant.mode=tsq")))
    plain = build(latte_stats, root / "plain", BuildConfig(recipe=recipe_of("granularity.time_ranges=1")))
    return tsq, plain


def test_eval_measures_every_build_against_fp_and_reports(two_builds, latte_stats, tmp_path):
    tsq, plain = two_builds
    result = evaluate([tsq.folder, plain.folder], ["a red circle moving left", "a green triangle moving up"], [0])
    fp = result.fp
    assert fp.adherence is not None and set(fp.accuracy) == {"colour", "shape", "direction"}
    for folder in (tsq.folder, plain.folder):
        s = result.builds[str(folder)]
        assert 10 < s.psnr_db < 80 and 0 < s.ssim <= 1
        assert len(s.psnr_samples) == 2 and s.psnr_db == pytest.approx(np.mean(s.psnr_samples))
        assert s.psnr_se_db == pytest.approx(abs(s.psnr_samples[0] - s.psnr_samples[1]) / 2)  # sd/sqrt(2), n = 2
        assert len(s.step_sqnr_db) == 4 and all(v > 10 for v in s.step_sqnr_db)
        assert s.model_mib > 1 and s.step_ms > 0
        assert s.temporal_kl is not None and 0 < s.temporal_kl < 0.1 and s.temporal_kl_se is not None
    assert fp.temporal_kl is None  # FP against itself is not measured
    write_json(result, tmp_path / "eval.json")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data["builds"]) == {str(tsq.folder), str(plain.folder)}
    header, fp_row, *rows = eval_table(data)
    assert "±s.e." in header and fp_row.split()[2:4] == ["-", "-"]  # FP has no PSNR vs itself
    assert f"{result.builds[str(tsq.folder)].psnr_se_db:.2f}" in rows[0]
    a, b = (result.builds[str(f)].psnr_samples for f in (tsq.folder, plain.folder))
    d = np.subtract(b, a)
    assert rows[2].startswith(f"PSNR against {str(tsq.folder)[-40:]}, paired over 2 samples")
    assert rows[3].split()[-4:] == [f"{d.mean():+.2f}", "±", f"{d.std(ddof=1) / np.sqrt(2):.2f}", "dB"]
    layers, table = layer_step_sqnr(
        tsq.adapter, [r.plan for r in tsq.ranges], tsq.manifest, "a red circle moving left", 0
    )
    # TSQ folds the attention outputs' 1/s into the value projections: those rows are not comparable
    folded = [i for i, name in enumerate(layers) if name.endswith(".to_v")]
    assert table.shape == (64, 4) and len(layers) == 64
    assert len(folded) == 12  # 4 spatial blocks x (self, cross) + 4 temporal blocks x self-attention
    assert np.isnan(table[folded]).all() and np.isfinite(np.delete(table, folded, axis=0)).all()
    manifests = {str(tsq.folder): tsq.manifest, str(plain.folder): plain.manifest}
    heat = {str(tsq.folder): (layers, table)}
    write_report(tmp_path / "report.html", data, result.first_samples, manifests, load(latte_stats), heat)
    page = (tmp_path / "report.html").read_text()
    # ranges, per-step curves, the heatmap, and FP / build / difference rows for each of the two builds
    assert page.count("src='data:image/png;base64,") == 3 + 2 * 3
    assert page.count("src='data:image/gif;base64,") == 2  # one animation per build
    assert page.count("NOT VERIFIED") == 2 and "smoothquant" in page  # no verification ran; the recipe
    assert page.count(f"{s.psnr_db:.2f} ± {s.psnr_se_db:.2f}") == 1  # the plain build's headline PSNR ± s.e.
    assert page.count("Target</b> ort-cpu") == 2 and "smoothing tsq" in page and "W8A8" in page  # the options


def test_eval_refuses_builds_that_sample_differently(two_builds, tmp_path):
    import shutil

    from qexport.exporter.manifest import write_manifest

    tsq, _ = two_builds
    other = tmp_path / "other"
    shutil.copytree(tsq.folder, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["cfg"] = 3.0  # another guidance scale: the same models sample differently
    write_manifest(other, manifest)
    with pytest.raises(QexportError, match="builds differ in model, steps or CFG"):
        evaluate([tsq.folder, other], ["a red circle moving left"], [0])


@pytest.mark.slow
def test_sweep_builds_the_grid_and_writes_paper_tables(latte_stats, tmp_path):
    from qexport.sweep import grid, paper_tables, sweep

    cells = grid(["CW+TW", "+TSQ+TSW"], ["W8A8", "W4A8"], None)
    result, folders = sweep(latte_stats, cells, tmp_path, ["a red circle moving left"], [0])
    assert len(folders) == 4 and {c.name for c in folders.values()} == {
        "W8A8 CW+TW",
        "W8A8 +TSQ+TSW",
        "W4A8 CW+TW",
        "W4A8 +TSQ+TSW",
    }
    table = "\n".join(paper_tables(result.to_json(), folders))
    cells_written = re.findall(r"\| \d+\.\d / \d\.\d{3} ", table)
    assert "| CW+TW |" in table and "| +TSQ+TSW |" in table and len(cells_written) == 4, table
    with pytest.raises(QexportError, match="unknown method"):
        grid(["+XYZ"], ["W8A8"], None)
    with pytest.raises(QexportError, match="bit widths look like"):
        grid(["CW+TW"], ["8bit"], None)


def test_temporal_kl_is_zero_for_fp_and_grows_with_the_frames_relations_disturbed():
    from qexport.metrics import frame_relations, temporal_kl

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 16, 16, 3))
    drift = np.linspace(0, 1, 16)[:, None, None, None] * rng.standard_normal((1, 16, 16, 3))
    clip = np.clip(128 + 40 * (base + drift), 0, 255)  # 16 frames that change smoothly
    d = frame_relations(clip)
    assert d.shape == (16, 16) and np.allclose(d.sum(axis=1), 1.0)
    assert np.argmax(d[0]) == 0 and d[0, 1] > d[0, 15]  # each frame is most like itself and its neighbours
    noisy = clip + rng.normal(0, 2, clip.shape)
    shuffled = clip[rng.permutation(16)]
    assert temporal_kl(clip, clip) == 0.0
    assert 0 < temporal_kl(clip, noisy) < temporal_kl(clip, shuffled)
