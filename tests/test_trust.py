"""What qexport loads on a file's word: never a pickle (no unpickling call anywhere in the package,
a pickled checkpoint refused by name), never a folder's own code (component classes of diffusers and
transformers only), and a model folder that a .qstats or a manifest names only with the user's
consent (--model or --trust-model-path); checks that can refuse a request run before any work."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qexport.cli import cli
from qexport.errors import QexportError
from qexport.models.registry import BUILTIN_DIR, ModelRequest, load_model
from qexport.tokenizer import VOCAB

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("qexport", "calib", "exporter", "passes", "targets", "verification")
FORBIDDEN = {
    "torch.load": r"\btorch\.load\b",
    "pickle": r"\b_?c?[pP]ickle\b",
    "allow_pickle=True": r"allow_pickle\s*=\s*True",
    "eval(": r"(?<![\w.])eval\(",  # not an nn.Module's .eval()
    "exec(": r"(?<![\w.])exec\(",
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
    "weights_only=False": r"weights_only\s*=\s*False",
}
LATTE = BUILTIN_DIR / "tiny-latte"  # the built-in's folder, named by path as a user's folder would be
CONVERT = "load it once in Python you trust and save_pretrained(..., safe_serialization=True)"


def test_the_package_never_unpickles_evaluates_or_trusts_remote_code():
    found = []
    for folder in PACKAGE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                found += [f"{path.relative_to(ROOT)}:{number}: {name}" for name, pattern in FORBIDDEN.items()
                          if re.search(pattern, line)]  # fmt: skip
    assert not found, "\n".join(found)


def _pickled_folder(root: Path) -> Path:
    """A transformer folder whose weights are only a pickled checkpoint (never opened: any bytes do)."""
    folder = root / "model"
    (folder / "transformer").mkdir(parents=True)
    shutil.copy(LATTE / "transformer" / "config.json", folder / "transformer" / "config.json")
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    return folder


def test_a_folder_with_only_pickled_weights_is_refused_naming_the_file(tmp_path):
    folder = _pickled_folder(tmp_path)
    checkpoint = folder / "transformer" / "diffusion_pytorch_model.bin"
    with pytest.raises(QexportError) as refused:
        load_model(f"diffusers:{folder}")
    assert str(refused.value) == (
        f"{checkpoint} is a pickled checkpoint and {folder / 'transformer'} has no .safetensors weights; qexport "
        f"loads safetensors only (unpickling can run code): {CONVERT}"
    )


def _pipeline_folder(root: Path, index: dict) -> Path:
    folder = root / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    for name, spec in index.items():
        if isinstance(spec, list) and spec[0] is not None:
            (folder / name).mkdir()
    return folder


def _load_pipeline(folder: Path) -> str:
    from qexport.models.pipeline import load_pipeline

    with pytest.raises(QexportError) as refused:
        load_pipeline(folder)
    return str(refused.value)


def test_a_component_class_of_another_module_is_refused_and_its_code_never_runs(tmp_path):
    folder = _pipeline_folder(tmp_path, {"_class_name": "DiTPipeline", "transformer": ["my_models", "MyTransformer"],
                                         "scheduler": ["diffusers", "DDIMScheduler"]})  # fmt: skip
    ran = tmp_path / "ran"
    (folder / "transformer" / "my_models.py").write_text(f"open({str(ran)!r}, 'w').close()\nclass MyTransformer: ...\n")
    assert _load_pipeline(folder) == (
        f"{folder / 'model_index.json'} names my_models.MyTransformer for 'transformer'; qexport loads diffusers "
        "and transformers classes only (a class of another module would be imported from code in the folder)"
    )
    assert not ran.exists()


def test_a_custom_pipeline_and_a_library_named_code_file_are_refused(tmp_path):
    custom = _pipeline_folder(tmp_path, {"_class_name": ["my_pipeline", "MyPipeline"]})
    assert _load_pipeline(custom) == (
        f"{custom / 'model_index.json'} names pipeline class ['my_pipeline', 'MyPipeline'], which diffusers lacks; "
        "qexport loads diffusers' own pipeline classes only (never a custom pipeline's code)"
    )
    shutil.rmtree(custom)
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    folder = _pipeline_folder(tmp_path, index)
    (folder / "transformer" / "diffusers.py").write_text("raise SystemExit('ran')\n")
    assert _load_pipeline(folder) == (
        f"{folder / 'transformer' / 'diffusers.py'} would be imported by diffusers as the code of component "
        "'transformer'; qexport loads library classes only: remove it"
    )


AUTO = {"_class_name": "PixArtAlphaPipeline", "tokenizer": ["transformers", "AutoTokenizer"]}


def test_auto_classes_pickled_components_and_tokenizers_without_tokenizer_json_are_refused(tmp_path):
    auto = _pipeline_folder(tmp_path, AUTO)
    assert "names the auto class transformers.AutoTokenizer for 'tokenizer'" in _load_pipeline(auto)
    shutil.rmtree(auto)
    index = {"_class_name": "PixArtAlphaPipeline", "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "T5Tokenizer"]}  # fmt: skip
    folder = _pipeline_folder(tmp_path, index)
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"not opened")
    assert _load_pipeline(folder).startswith(f"{folder / 'text_encoder' / 'pytorch_model.bin'} is a pickled checkpoint")
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer" / "spiece.model").write_bytes(b"")
    assert _load_pipeline(folder) == (
        f"{folder / 'tokenizer'} has no tokenizer.json; qexport loads tokenizers from tokenizer.json only: save the "
        "tokenizer with transformers 5 (save_pretrained writes it)"
    )


# --- consent: a model folder a file names ---------------------------------------------------------


def test_a_model_request_resolves_names_and_refuses_both_kinds_of_consent():
    named = f"diffusers:{LATTE}"
    assert ModelRequest().model_id("tiny-latte", "x.qstats", "calibrated there") == "tiny-latte"
    assert ModelRequest(trust_model_path=True).model_id(named, "x.qstats", "calibrated there") == named
    for given in (str(LATTE), named, f"pipeline:{LATTE}"):
        assert ModelRequest(model=given).model_id("other", "x.qstats", "calibrated there") == named
    with pytest.raises(QexportError, match=r"^give --model PATH or --trust-model-path, not both$"):
        ModelRequest(model=str(LATTE), trust_model_path=True)


@pytest.fixture(scope="module")
def path_stats(tmp_path_factory):
    """tiny-latte's statistics as a user's folder's: the header names the built-in folder by path."""
    from qexport.calib.run import CalibConfig, calibrate
    from qexport.calib.store import save

    from qexport.models.sampler import SamplingConfig

    adapter = load_model(f"diffusers:{LATTE}")
    config = CalibConfig(prompts=("a red circle moving left",), sampling=SamplingConfig(steps=2, cfg=7.0))
    path = tmp_path_factory.mktemp("path") / "run.qstats"
    save(calibrate(adapter, config).stats, path)
    return path


ONE_RANGE = ["--set", "granularity.time_ranges=1", "--no-verify"]


def _refused(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, QexportError), result.output
    return str(result.exception)


def test_build_loads_a_folder_the_statistics_name_only_with_consent(path_stats, tmp_path):
    out = tmp_path / "out"
    assert _refused(["build", str(path_stats), *ONE_RANGE, "-o", str(out)]) == (
        f"{path_stats} names the model folder {LATTE} (calibrated there); pass --model {LATTE} to load it, "
        "or --trust-model-path"
    )
    mismatch = _refused(["build", str(path_stats), *ONE_RANGE, "--model", "tiny-dit", "-o", str(out)])
    assert mismatch.startswith(f"{path_stats} were calibrated on model 'diffusers:{LATTE}'"), mismatch
    assert "not on 'tiny-dit'" in mismatch
    both = _refused(["build", str(path_stats), *ONE_RANGE, "--model", str(LATTE), "--trust-model-path", "-o", str(out)])
    assert both == "give --model PATH or --trust-model-path, not both"
    words = " ".join(VOCAB[1:])
    bad = _refused(["build", str(path_stats), "--set", "granularity.time_ranges=1", "--trust-model-path",
                    "--prompt", "a red dog", "-o", str(out)])  # fmt: skip
    assert bad == f"unknown word 'dog' in prompt 'a red dog'; the vocabulary is: {words}"
    assert not list(tmp_path.iterdir())  # nothing written: no folder, no temporary


@pytest.fixture(scope="module")
def path_build(path_stats):
    """A one-range build of path_stats, its model loaded with --trust-model-path."""
    out = path_stats.parent / "build"
    result = CliRunner().invoke(cli, ["build", str(path_stats), *ONE_RANGE, "--trust-model-path", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_verify_loads_the_folder_a_manifest_names_only_with_consent(path_build, path_stats):
    manifest = path_build / "manifest.json"
    assert json.loads(manifest.read_text())["model_id"] == f"diffusers:{LATTE}"
    assert _refused(["verify", str(path_build), "--models", "0"]) == (
        f"{manifest} names the model folder {LATTE} (built from it); pass --model {LATTE} to load it, "
        "or --trust-model-path"
    )
    # refused from the manifest alone, before consent is even asked for
    assert _refused(["verify", str(path_build), "--models", "3"]) == "no model 3 in this build; it has models 0..0"
    result = CliRunner().invoke(cli, ["verify", str(path_build), "--models", "0", "--model", str(LATTE)])
    assert result.exit_code == 0 and "verdict: PASS" in result.output, result.output


def test_eval_loads_the_folder_a_manifest_names_only_with_consent(path_build):
    message = _refused(["eval", str(path_build), "--labels", "a red circle moving left"])
    assert message == (
        f"{path_build / 'manifest.json'} names the model folder {LATTE} (built from it); pass --model {LATTE} "
        "to load it, or --trust-model-path"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no CUDA device")
def test_a_device_torch_cannot_see_is_refused_before_the_build(path_stats, tmp_path):
    out = tmp_path / "out"
    message = _refused(["build", str(path_stats), "--trust-model-path", "--verify-device", "cuda", "-o", str(out)])
    assert message == "--verify-device cuda: torch sees no CUDA device here; use --verify-device cpu"
    message = _refused(["build", str(path_stats), "--trust-model-path", "--device", "cuda", "-o", str(out)])
    assert message == "--device cuda: torch sees no CUDA device here; use --device cpu"
    message = _refused(["build", str(path_stats), "--trust-model-path", "--device", "tpu9", "-o", str(out)])
    assert message == "--device 'tpu9' is not a torch device; give cpu or cuda"
    assert not list(tmp_path.iterdir())


def test_verify_names_statistics_of_another_model(path_build, latte_stats, tmp_path):
    from qexport.calib.store import load, save

    other = load(latte_stats)  # tiny-latte's own statistics, passed as another model's
    other.header["model_id"], other.header["config_hash"] = "tiny-dit", "0123456789abcdef"
    save(other, tmp_path / "dit.qstats")
    built = json.loads((path_build / "manifest.json").read_text())
    message = _refused(["verify", str(path_build), "--stats", str(tmp_path / "dit.qstats"), "--trust-model-path"])
    assert message == (
        f"{tmp_path / 'dit.qstats'} was calibrated on another model: 'tiny-dit' (config 0123456789abcdef), not "
        f"this build's 'diffusers:{LATTE}' (config {built['calibration']['config_hash']}); pass the .qstats it was "
        "built from with --stats"
    )
