"""The build recipe: presets, the generic dict / YAML round trip, strict checking, --set."""

import dataclasses

import pytest
import yaml
from qexport.passes.techniques import ORDER, TECHNIQUES
from qexport.passes.techniques.shift import ChannelShift
from qexport.passes.techniques.smoothquant import SmoothQuant

from qexport.errors import QexportError
from qexport.recipe import Granularity, Recipe, dump_recipe, load_recipe, preset_names, with_settings

PRESETS = {
    "w8a8-asq",
    "w8a8-asq-tsw",
    "w8a8-tsq-tsw",
    "w8a8-best",
    "w4a8-tsq-tsw-gptq",
    "w4a8",
    "w4a6",
    "w3a8",
    "w8a16",
    "qnn-w8a16",
    "qnn-w4a16",
}


def test_every_preset_loads_and_round_trips_through_yaml(tmp_path):
    assert set(preset_names()) >= PRESETS
    for name in preset_names():
        recipe = load_recipe(name)
        assert recipe.description, name
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        dump_recipe(recipe, tmp_path / f"{name}.yaml")
        assert load_recipe(str(tmp_path / f"{name}.yaml")) == recipe
        assert yaml.safe_load((tmp_path / f"{name}.yaml").read_text())["version"] == 1


def test_the_dict_names_each_technique_by_type_and_follows_the_registry_order():
    recipe = Recipe(techniques=(ChannelShift(), SmoothQuant(mode="tsq")), granularity=Granularity(time_ranges=None))
    data = recipe.to_dict()
    assert [t["_type"] for t in data["techniques"]] == ["smoothquant", "channel_shift"]
    assert data["techniques"][0] == {"_type": "smoothquant", "mode": "tsq", "alpha": 0.5, "statistic": "ema",
                                     "shared_ranges": 0}  # fmt: skip
    assert set(data) == {f.name for f in dataclasses.fields(Recipe)}


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (["bits.weight=4"], "unknown recipe key 'bits.weight'"),
        (["smoothquant.colour=red"], "unknown recipe key 'smoothquant.colour'; valid keys here: alpha, mode"),
        (["nonsense=1"], "unknown recipe key 'nonsense'"),
        (["bits.weights=eight"], "recipe key 'bits.weights' must be int, got str 'eight'"),
        (["bits.weights=9"], "recipe key 'bits.weights' must be in 2..8, got 9"),
        (["smoothquant.alpha=fast"], "recipe key 'smoothquant.alpha' must be float or one of 'auto', 'layer'"),
        (["smoothquant.mode=xsq"], "recipe key 'smoothquant.mode' must be one of 'asq', 'tsq'"),
        (["channel_shift=on", "lowrank.rank=4"], "'channel_shift' does not combine with 'lowrank'"),
        (["lowrank.rank=40"], "recipe key 'lowrank.rank' must be in 1..32, got 40"),
        (["replay.prompts=2"], "recipe key 'replay.prompts' sets how many"),
        (["replay.scoring=tf32"], "recipe key 'replay.scoring' sets the precision of the searches' scoring"),
        (["gptq.alpha_scoring=gptq"], "recipe key 'gptq.alpha_scoring' sets how an alpha search scores"),
        (["replay.scoring=bf16"], "recipe key 'replay.scoring' must be one of 'fp32', 'tf32', got 'bf16'"),
        (["smoothquant.statistic=max"], "it needs mode 'asq'"),
        (["smoothquant.shared_ranges=2", "granularity.time_ranges=2"], "'smoothquant.shared_ranges'"),
        (["mixed_precision.budget=6"], "it needs bits.weights 2..4, got 8"),
        (["online_rotation.block=48"], "power of two"),
        (["bits"], "--set takes KEY=VALUE"),
        (["channel_shift=maybe"], "takes on or off"),
    ],
)
def test_bad_recipes_are_refused_naming_the_key(assignments, message):
    with pytest.raises(QexportError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        with_settings(load_recipe("w8a8-tsq-tsw"), assignments)


def test_set_adds_changes_and_removes_techniques():
    base = load_recipe("w8a8-tsq-tsw")
    changed = with_settings(base, ["bits.weights=4", "gptq=on", "smoothquant.alpha=auto", "granularity.time_ranges=2"])
    assert changed.bits.weights == 4 and changed.granularity.time_ranges == 2
    assert [t.kind for t in changed.techniques] == ["smoothquant", "gptq"]
    assert changed.replaying() == ["smoothquant", "gptq"]
    assert with_settings(changed, ["gptq=off", "smoothquant=off"]).techniques == ()
    assert with_settings(base, ["granularity.time_ranges=null"]) == base
    assert with_settings(base, ["lowrank.rank=8"]).technique("lowrank").settings() == {"lowrank": 8}


def test_a_file_recipe_names_its_file_in_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ntechniques:\n  - {_type: smoothquant, mode: tsq, alfa: 0.5}\n")
    with pytest.raises(QexportError, match=r"bad\.yaml: unknown recipe key 'smoothquant\.alfa'"):
        load_recipe(str(path))
    path.write_text("techniques: [unclosed\n")
    with pytest.raises(QexportError, match="is not valid YAML"):
        load_recipe(str(path))
    with pytest.raises(QexportError, match="no recipe preset 'w9a9'; presets: "):
        load_recipe("w9a9")
    path.write_text("version: 2\n")
    with pytest.raises(QexportError, match="recipe key 'version' must be 1"):
        load_recipe(str(path))


def test_the_registry_is_explicit_and_complete():
    assert list(TECHNIQUES) == [t.kind for t in ORDER] and len(set(TECHNIQUES)) == len(ORDER)
    for kind, cls in TECHNIQUES.items():
        assert cls.summary, kind
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, kind
        for other in cls.excludes:
            assert other in TECHNIQUES, (kind, other)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from qexport.cli import main; main()", *args],
                          capture_output=True, text=True)  # fmt: skip


def _digests(folder):
    import hashlib

    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.suffix in (".onnx", ".bin")
    }


def test_a_dumped_recipe_rebuilds_the_same_files_and_bad_keys_are_one_line(latte_stats, tmp_path):
    recipe = tmp_path / "r.yaml"
    first = ["build", str(latte_stats), "--recipe", "w8a8-asq", "--set", "smoothquant.alpha=0.6", "--no-verify"]
    proc = _cli(*first, "--dump-recipe", str(recipe), "-o", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    proc = _cli("build", str(latte_stats), "--recipe", str(recipe), "--no-verify", "-o", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b") and len(_digests(tmp_path / "a")) >= 2
    assert load_recipe(str(recipe)).technique("smoothquant").alpha == 0.6
    for change, key in (("smoothquant.alfa=0.6", "'smoothquant.alfa'"), ("bits.weights=eight", "'bits.weights'"),
                        ("lowrank.rank=4", "'channel_shift' does not combine with 'lowrank'")):  # fmt: skip
        proc = _cli("build", str(latte_stats), "--recipe", "w8a8-best", "--set", change, "-o", str(tmp_path / "c"))
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and key in errors[0], proc.stderr
    assert not (tmp_path / "c").exists()
