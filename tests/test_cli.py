import subprocess
import sys

from click.testing import CliRunner
from PIL import Image

from qexport import __version__
from qexport.cli import cli


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_models_lists_builtins_with_sizes():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    for name in ("tiny-latte", "tiny-dit"):
        assert "M" in lines[name].split()[2] and "MiB" in lines[name].split()[3], lines[name]
    for name in ("dit-xl-2", "pixart-alpha-512", "latte-1"):
        assert "[random-init]" in lines[name]


def test_sample_builtin_video_writes_gif_and_strip(tmp_path):
    out = tmp_path / "clip.gif"
    result = CliRunner().invoke(
        cli, ["sample", "--model", "tiny-latte", "--prompt", "a blue square moving up", "--steps", "4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    gif = Image.open(out)
    assert gif.n_frames == 16 and gif.size == (128, 128)
    assert Image.open(tmp_path / "clip.png").size == (16 * 128, 128)


def test_sample_builtin_image(tmp_path):
    out = tmp_path / "img.png"
    result = CliRunner().invoke(
        cli, ["sample", "--model", "tiny-dit", "--label", "red circle", "--steps", "4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (128, 128)


def _run(*args):
    return subprocess.run(
        [sys.executable, "-c", "from qexport.cli import main; main()", *args], capture_output=True, text=True
    )


def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path):
    out = tmp_path / "x.gif"
    cases = [
        (["sample", "--model", "nope", "--prompt", "a", "-o", str(out)], "unknown model 'nope'"),
        (["sample", "--model", "tiny-latte", "--prompt", "a purple circle moving up", "-o", str(out)], "unknown word"),
        (["sample", "--model", f"diffusers:{tmp_path / 'missing'}", "--prompt", "a", "-o", str(out)], "does not exist"),
    ]
    for args, message in cases:
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_an_interrupt_exits_130_with_one_line_even_after_one_inside_c_code(tmp_path):
    """An interrupt that first surfaced inside a C extension's PyRun_* call leaves CPython's 'unhandled
    KeyboardInterrupt' flag set; under `python -m` a plain sys.exit(130) then dies of SIGINT (-2)."""
    (tmp_path / "interrupted.py").write_text(
        "import ctypes, sys\n"
        "import click\n"
        "from qexport import cli\n"
        "ctypes.pythonapi.PyRun_SimpleString(b'raise KeyboardInterrupt')  # sets the flag, as C code can\n"
        "@click.command()\n"
        "def stopped():\n"
        "    raise KeyboardInterrupt\n"
        "cli.cli = stopped\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-m", "interrupted"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.rstrip().endswith("aborted") and proc.stderr.count("Traceback") == 1, proc.stderr
