"""Interrupted work is never half-trusted: calibrate, build and verify stopped by SIGINT or SIGKILL at
points spread over their run leave either nothing new, or whole files that later commands accept, or
a build that `run` refuses until it is verified. Two builds into one folder at once cannot interleave."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qexport.calib.store import load

from qexport.errors import QexportError
from qexport.media import folder_lock, written_whole
from qexport.runtime.manifest import read_manifest

PROMPT = "a red circle moving left"
# (progress line of stderr after which the signal is sent, seconds waited after it); the default suite's points:
FAST = {
    "calibrate": ((4, 0.0),),  # after the last step: while the statistics are saved
    "build": ((2, 0.0), (6, 0.3)),  # while models are emitted; while verifying
    "verify": ((3, 0.0),),
}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qexport", *args]


def _lines(args: list[str], cwd: Path) -> int:
    """Run to completion; the number of progress lines it printed on stderr."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return len(proc.stderr.splitlines())


def _spread(lines: int) -> tuple[tuple[int, float], ...]:
    """Ten points over a run of `lines` progress lines: before the first, between lines, after the last."""
    return tuple((round(i * lines / 9), 0.0 if i % 2 else 0.15) for i in range(10))


def _interrupted(args: list[str], cwd: Path, point: tuple[int, float], sig: int) -> subprocess.CompletedProcess[str]:
    """Run args and send sig once it has printed point[0] lines on stderr and point[1] seconds more passed."""
    line, wait = point
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    while len(seen) < line and (text := proc.stderr.readline()):
        seen.append(text)
    time.sleep(wait)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, "".join(seen) + err)


def _visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def _exit_ok(proc: subprocess.CompletedProcess[str], sig: int) -> None:
    """Finished, or stopped by the signal: SIGINT ends with "aborted" and exit 130, never a traceback."""
    if proc.returncode == 0:
        return
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    else:
        assert proc.returncode == 130 and proc.stderr.rstrip().endswith("aborted"), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _refused_run(build: Path, cwd: Path) -> str:
    proc = subprocess.run(_cmd("run", str(build), "--prompt", PROMPT, "-o", "x.gif"), cwd=cwd,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def _calibrate_case(_stats: Path, tmp: Path, points: tuple[tuple[int, float], ...] | None, sig: int) -> None:
    (tmp / "p.txt").write_text(f"{PROMPT}\na blue square moving up\n")
    args = _cmd("calibrate", "--model", "tiny-latte", "--prompts", "p.txt", "--steps", "4", "-o", "s.qstats")
    if points is None:
        points = _spread(_lines(args, tmp))
        (tmp / "s.qstats").unlink()
    for point in points:
        proc = _interrupted(args, tmp, point, sig)
        _exit_ok(proc, sig)
        new = _visible(tmp) - {"p.txt"}
        assert new <= {"s.qstats"}, new
        if "s.qstats" in new:  # written whole, so it loads and is complete
            assert load(tmp / "s.qstats").steps == 4
            (tmp / "s.qstats").unlink()
        else:
            with pytest.raises(QexportError, match="does not exist"):
                load(tmp / "s.qstats")


def _build_case(stats: Path, tmp: Path, points: tuple[tuple[int, float], ...] | None, sig: int) -> None:
    args = _cmd("build", str(stats), "-o", "b", "--prompt", PROMPT)
    lines = _lines(args, tmp)
    assert read_manifest(tmp / "b")["verification"]["ok"] is True
    for point in points or _spread(lines):
        proc = _interrupted([*args, "--force"], tmp, point, sig)
        _exit_ok(proc, sig)
        assert _visible(tmp) == {"b"}  # the previous build stays until the new one replaces it whole
        manifest = read_manifest(tmp / "b")  # whole: every file it names is there
        if manifest["verification"] is None:  # emitted, stopped while verifying: run refuses it
            assert "was never verified" in _refused_run(tmp / "b", tmp)


def _verify_case(stats: Path, tmp: Path, points: tuple[tuple[int, float], ...] | None, sig: int) -> None:
    subprocess.run(_cmd("build", str(stats), "-o", "b", "--no-verify"), cwd=tmp, check=True, capture_output=True)
    before = (tmp / "b" / "manifest.json").read_bytes()
    args = _cmd("verify", "b", "--stats", str(stats), "--prompt", PROMPT)
    if points is None:
        points = _spread(_lines(args, tmp))
    for point in points:
        (tmp / "b" / "manifest.json").write_bytes(before)  # unverified again
        proc = _interrupted(args, tmp, point, sig)
        _exit_ok(proc, sig)
        manifest = read_manifest(tmp / "b")
        if proc.returncode == 0:
            assert manifest["verification"]["ok"] is True
        else:  # the manifest is the one before, or (stopped after its atomic write) the verified one
            assert manifest["verification"] is None or manifest["verification"]["ok"] is True
            if manifest["verification"] is None:
                assert "was never verified" in _refused_run(tmp / "b", tmp)


CASES = {"calibrate": _calibrate_case, "build": _build_case, "verify": _verify_case}


@pytest.mark.parametrize(
    ("command", "sig"),
    [("calibrate", signal.SIGKILL), ("build", signal.SIGINT), ("verify", signal.SIGKILL)],
    ids=["calibrate-sigkill", "build-sigint", "verify-sigkill"],
)  # the slow test below takes both signals at ten points of each
def test_interrupted_commands_leave_nothing_trusted(latte_stats, tmp_path, command, sig):
    CASES[command](latte_stats, tmp_path, FAST[command], sig)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
@pytest.mark.parametrize("command", list(CASES))
def test_ten_interruptions_of_each_command(latte_stats, tmp_path, command, sig):
    CASES[command](latte_stats, tmp_path, None, sig)


def test_a_second_writer_of_one_folder_is_refused_and_stale_temporaries_go(tmp_path):
    out = tmp_path / "b"
    (tmp_path / ".b.building-killed").mkdir()  # what a SIGKILLed build leaves
    with written_whole(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
        assert not (tmp_path / ".b.building-killed").exists()
        child = subprocess.run(
            [sys.executable, "-c", "from pathlib import Path; from qexport.media import folder_lock\n"
             f"with folder_lock(Path({str(out)!r})): pass"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert child.returncode != 0
        assert child.stderr.strip().splitlines()[-1] == (
            f"qexport.errors.QexportError: another qexport (pid {os.getpid()}) is writing {out} now; wait for it to "
            "finish or choose another folder"
        )
    assert json.loads((out / "manifest.json").read_text()) == {}
    with folder_lock(out):  # released when the build ended; taken by contexts (and verify) too
        from click.testing import CliRunner

        from qexport.cli import cli

        held = CliRunner().invoke(cli, ["contexts", str(out)])
        assert str(held.exception) == (
            f"another qexport (pid {os.getpid()}) is writing {out} now; wait for it to finish or choose another folder"
        )
    assert {p.name for p in tmp_path.iterdir()} == {"b", ".b.lock"}
