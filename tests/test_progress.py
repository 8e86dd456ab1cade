"""Progress of long work: the printer on a terminal and piped, and the CLI's progress, threads and
argument checks on a short build of the built-in tiny-latte."""

import io
import subprocess
import sys

import pytest
from qexport.exporter.build import BuildConfig, build

from qexport.progress import ProgressPrinter, Tick, Units, duration
from qexport.recipe import recipe_of


def _ticks(printer, task, total, details=()):
    for done in range(total + 1):
        printer(Tick(task=task, done=done, total=total, detail=details[done] if done < len(details) else ""))


def test_piped_printer_writes_one_complete_line_per_tick():
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=False)
    _ticks(printer, "evaluating", 3, ["loading", "FP 'a'", "FP 'b'"])
    _ticks(printer, "building", 2)
    printer.close()
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in out.getvalue()  # every line ended, nothing redrawn
    lines = lines[:-1]
    assert len(lines) == 4 + 3, lines
    assert lines[0].startswith("evaluating: 0/3") and "ETA -" in lines[0] and lines[0].endswith("loading")
    assert lines[1].startswith("evaluating: 1/3") and "ETA " in lines[1] and lines[1].endswith("FP 'a'")
    assert lines[3].startswith("evaluating: 3/3 100%") and "took " in lines[3]
    assert lines[4].startswith("building: 0/2")


def test_terminal_printer_redraws_one_line_per_task_and_ends_it():
    out = io.StringIO()
    printer = ProgressPrinter(out, tty=True)
    _ticks(printer, "calibrating", 4)
    printer.say("a message")
    _ticks(printer, "verifying", 2)
    printer.close()
    text = out.getvalue()
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 4, lines  # calibrating, the message, verifying, all ended
    assert lines[0].count("\r") == 5 and lines[0].rsplit("\r", 1)[1].endswith("4/4 100% took 0s")
    assert "[" + "#" * 24 + "]" in lines[0] and lines[1] == "a message"
    assert lines[2].count("\r") == 3


def test_durations_and_units():
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
    seen = []
    units = Units(seen.append, "samples", 5)
    units.start("loading")
    units.done("a")
    units.done("b", n=3)
    assert [(t.done, t.total, t.detail) for t in seen] == [(0, 5, "loading"), (1, 5, "a"), (4, 5, "b")]
    Units(None, "nothing", 1).done()  # no callback: nothing to report, no error


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from qexport.cli import main; main()", *args], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def one_model(latte_stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "out"
    build(latte_stats, out, BuildConfig(recipe=recipe_of("granularity.time_ranges=1")))
    return out


def test_eval_prints_a_line_per_sample_when_piped(one_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    out = tmp_path / "eval.json"
    proc = _cli("eval", str(one_model), "--prompts", str(prompts), "--threads", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "evaluating 1 build(s) on 2 prompt(s) x 1 seed(s)", lines
    ticks = [line for line in lines if line.startswith("evaluating (samples): ")]
    # a start line, then per prompt: the FP sample, the build's sample, the build's per-step SQNR pass
    assert [t.split(": ")[1].split(" ")[0] for t in ticks] == [f"{k}/6" for k in range(7)], ticks
    report = tmp_path / "report.html"
    assert "'a blue square moving up'" in ticks[2]
    assert proc.stdout.splitlines()[-1].startswith(f"wrote {out} and {report} in ")
    assert proc.stdout.splitlines()[-2] == (  # built by the library call: flagged, not refused
        f"note: {one_model} was never verified (built with --no-verify, or its verification was interrupted): "
        "these are figures of an unverified build"
    )
    page = report.read_text()  # the report of the evaluated build: its options and verdict at the top
    assert page.startswith("<!doctype html>") and "qexport report: tiny-latte" in page and "Headline numbers" in page


def test_run_shows_steps_and_checks_its_arguments(one_model, tmp_path):
    gif = tmp_path / "clip.gif"
    refused = _cli("run", str(one_model), "--prompt", "a red circle moving left", "-o", str(gif))
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1] == (
        f"error: {one_model} was never verified (built with --no-verify, or its verification was interrupted); "
        f"run qexport verify {one_model} first, or pass --allow-unverified to run it anyway"
    ), refused.stderr
    args = ["--prompt", "a red circle moving left", "--threads", "1", "--allow-unverified", "-o", str(gif)]
    proc = _cli("run", str(one_model), *args)  # built by the library call: not verified
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"warning: {one_model} was never verified; running it because --allow-unverified was given"
    ), proc.stderr
    assert sum(line.startswith("denoising (steps): ") for line in proc.stderr.splitlines()) == 4, proc.stderr
    assert gif.is_file() and "model loading not hidden by the prefetch" in proc.stdout
    cases = [
        (["--label", "red circle", "-o", str(tmp_path / "a.gif")], "text-conditioned: give --prompt"),
        (["--prompt", "a red circle moving left", "-o", str(tmp_path / "a.mp4")], "give a .gif path"),
        (["--prompt", "a red circle moving left", "--threads", "0", "-o", str(tmp_path / "a.gif")], "--threads"),
    ]
    for args, message in cases:
        proc = _cli("run", str(one_model), "--allow-unverified", *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (args, proc.stderr)
    assert not (tmp_path / "a.gif").exists() and not (tmp_path / "a.mp4").exists()


def test_sample_refuses_the_wrong_conditioning_and_suffix(tmp_path):
    cases = [
        (["--model", "tiny-dit", "--prompt", "a red circle", "-o", str(tmp_path / "x.png")], "class-conditional"),
        (["--model", "tiny-dit", "--label", "red circle", "-o", str(tmp_path / "x.gif")], "give a .png path"),
        (["--model", "tiny-latte", "--label", "red circle", "-o", str(tmp_path / "x.gif")], "text-conditioned"),
    ]
    for args, message in cases:
        proc = _cli("sample", "--steps", "2", *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (args, proc.stderr)
    assert not list(tmp_path.iterdir())


def test_build_names_a_missing_stats_file_before_anything_else(tmp_path):
    proc = _cli("build", str(tmp_path / "none.qstats"), "-o", str(tmp_path / "out"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "none.qstats does not exist" in errors[0] and "qexport calibrate" in errors[0]
