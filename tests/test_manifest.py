"""manifest.json as untrusted input: a build reads back as written, sealed and with every file's
digest; the exact messages a user meets (an absolute or '..' model path, a symlink out of the
folder, an external-data location that leaves it, a flipped byte in w.bin, an edit without
resealing, a schema-3 manifest); nothing outside the build folder is opened while a manifest
with traversal attempts is read and run; the committed JSON Schema is the model's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from manifest_mutations import Opens, make_build, run_build
from qexport.exporter.manifest import write_manifest
from qexport.targets.legality_schema import read_legality

from qexport.errors import QexportError
from qexport.runtime.files import model_path
from qexport.runtime.manifest import manifest_digest, read_manifest
from qexport.runtime.manifest_schema import Manifest

REBUILD = "rebuild the folder with qexport build"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_build(tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="module")
def opens():
    recorder = Opens()
    yield recorder
    recorder.close()


@pytest.fixture
def copy(base, tmp_path):
    return Path(shutil.copytree(base, tmp_path / "b"))


def _data(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _reseal(folder: Path, data: dict) -> None:
    """What someone editing the manifest on purpose does: the digest recomputed (files untouched)."""
    data["digest"] = manifest_digest(data)
    (folder / "manifest.json").write_text(json.dumps(data, indent=2))


def _message(folder: Path) -> str:
    with pytest.raises(QexportError) as err:
        read_manifest(folder)
    return str(err.value)


def _external(folder: Path, name: str, location: str) -> str:
    """Point every external-data location of model `name` at `location`; the first tensor's name."""
    model = onnx.load(str(folder / name), load_external_data=False)
    tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in tensors:
        next(e for e in t.external_data if e.key == "location").value = location
    (folder / name).write_bytes(model.SerializeToString())
    return tensors[0].name


def test_a_build_reads_back_as_written_sealed_with_every_file(base):
    data = _data(base)
    assert read_manifest(base) == data and data["schema_version"] == 4
    assert data["digest"] == manifest_digest(data)
    files = data["integrity"]["files"]
    assert sorted(files) == sorted(p.name for p in base.iterdir() if p.name != "manifest.json")
    assert files["w.bin"]["bytes"] == (base / "w.bin").stat().st_size
    assert [r["model"] for r in read_legality(base / "legality.json")] == [f"step_{i:02d}.onnx" for i in range(4)]


def test_an_absolute_model_path_names_the_field(copy):
    data = _data(copy)
    data["steps"][0]["model"] = data["ranges"][0]["model"] = "/etc/passwd"
    _reseal(copy, data)
    assert _message(copy) == (
        f"{copy / 'manifest.json'}: field 'steps[0].model': an absolute path; a build names its files relative "
        f"to its folder, got '/etc/passwd' (and 1 more); {REBUILD}"
    )


def test_a_dotdot_model_path_names_the_field(copy):
    data = _data(copy)
    data["ranges"][1]["model"] = "../b2/step_01.onnx"
    _reseal(copy, data)
    assert _message(copy) == (
        f"{copy / 'manifest.json'}: field 'ranges[1].model': a path with '..', which leaves the build folder, "
        f"got '../b2/step_01.onnx'; {REBUILD}"
    )


def test_a_symlink_out_of_the_folder_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere" / "step_02.onnx"
    outside.parent.mkdir()
    shutil.copyfile(copy / "step_02.onnx", outside)  # the same bytes: only where it lies is wrong
    (copy / "step_02.onnx").unlink()
    (copy / "step_02.onnx").symlink_to(outside)
    assert _message(copy) == (
        f"step_02.onnx named in {copy / 'manifest.json'} resolves to {outside.resolve()}, outside the build "
        f"folder {copy.resolve()} (a symlink out of it); a build's files must lie inside its folder"
    )


def test_an_external_data_location_leaving_the_folder_is_refused_before_onnxruntime(copy, tmp_path, opens):
    shutil.copyfile(copy / "w.bin", tmp_path / "w.bin")
    tensor = _external(copy, "step_00.onnx", "../w.bin")
    write_manifest(copy, _data(copy))  # resealed whole, file records too: only the model's own names are wrong
    assert read_manifest(copy)["integrity"]["files"]["step_00.onnx"]
    opens.paths.clear()
    opens.active = True
    try:
        with pytest.raises(QexportError) as err:
            run_build(copy)
    finally:
        opens.active = False
    assert str(err.value) == (
        f"step_00.onnx in {copy} names the external data of tensor {tensor!r} '../w.bin': a path with '..', "
        f"which leaves the build folder; {REBUILD}"
    )
    assert str(tmp_path / "w.bin") not in opens.paths and not opens.outside(copy)


def test_an_external_data_symlink_or_absolute_location_is_refused(copy, tmp_path):
    shutil.copyfile(copy / "w.bin", tmp_path / "w.bin")
    tensor = _external(copy, "step_00.onnx", str(tmp_path / "w.bin"))
    with pytest.raises(QexportError) as err:
        model_path(copy, "step_00.onnx")
    assert str(err.value) == (
        f"step_00.onnx in {copy} names the external data of tensor {tensor!r} {str(tmp_path / 'w.bin')!r}: an "
        f"absolute path; a build names its files relative to its folder; {REBUILD}"
    )
    _external(copy, "step_00.onnx", "link.bin")
    (copy / "link.bin").symlink_to(tmp_path / "w.bin")
    with pytest.raises(QexportError, match=r"link\.bin named in step_00\.onnx \(the external data of tensor .*\) "
                       r"resolves to .*, outside the build folder"):  # fmt: skip
        model_path(copy, "step_00.onnx")


def test_an_epcontext_binary_leaving_the_folder_is_refused(tmp_path):
    from onnx import TensorProto, helper

    def context_model(cache: str) -> None:
        node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", embed_mode=0,
                                ep_cache_context=cache, source="QNN")  # fmt: skip
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
        onnx.save(helper.make_model(graph), str(tmp_path / "context" / "m_ctx.onnx"))

    (tmp_path / "context").mkdir()
    (tmp_path / "context" / "m_ctx_qnn.bin").write_bytes(b"0")  # beside the context model, as QNN writes it
    context_model("m_ctx_qnn.bin")
    assert model_path(tmp_path, "context/m_ctx.onnx") == (tmp_path / "context" / "m_ctx.onnx").resolve()
    context_model("../../ctx_qnn.bin")
    with pytest.raises(QexportError) as err:
        model_path(tmp_path, "context/m_ctx.onnx")
    assert str(err.value) == (
        f"context/m_ctx.onnx in {tmp_path} names the context binary '../../ctx_qnn.bin': a path with '..', "
        f"which leaves the build folder; {REBUILD}"
    )


def test_a_flipped_byte_in_the_weights_names_the_file(copy):
    blob = bytearray((copy / "w.bin").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (copy / "w.bin").write_bytes(bytes(blob))
    assert _message(copy) == (
        f"w.bin in {copy} does not match the sha256 {copy / 'manifest.json'} records for it: the file was "
        f"changed after the build; {REBUILD}"
    )


def test_an_edit_without_resealing_is_refused(copy):
    data = _data(copy)
    data["cfg"] = 3.0
    (copy / "manifest.json").write_text(json.dumps(data, indent=2))
    assert _message(copy) == (
        f"{copy / 'manifest.json'} was changed after qexport wrote it: its content does not match its digest; {REBUILD}"
    )


def test_a_schema_3_manifest_is_refused_saying_to_rebuild(copy):
    data = _data(copy)
    data["schema_version"] = 3
    for key in ("digest", "integrity"):
        del data[key]
    (copy / "manifest.json").write_text(json.dumps(data, indent=2))
    assert _message(copy) == (
        f"{copy / 'manifest.json'} has manifest schema 3, which this qexport no longer reads (it reads schema 4, "
        "sealed with the digests of its files); rebuild with this qexport"
    )


def test_a_resealed_edit_runs_and_a_reseal_by_write_manifest_keeps_reading(copy, base):
    data = _data(copy)
    data["cfg"] = 3.0
    _reseal(copy, data)
    assert read_manifest(copy)["cfg"] == 3.0  # sealed again: read, and runs with the new scale
    assert not np.array_equal(run_build(copy), run_build(base))
    data["verification"] = {"ok": True, "sqnr_db": float("inf")}
    write_manifest(copy, data)
    assert read_manifest(copy)["verification"]["sqnr_db"] == "inf"  # strict JSON: no Infinity written


def test_write_manifest_refuses_what_its_readers_would(copy):
    data = _data(copy)
    data["ranges"][0]["model"] = data["steps"][0]["model"] = "../step_00.onnx"
    with pytest.raises(QexportError, match=r"field 'steps\[0\]\.model': a path with '\.\.'"):
        write_manifest(copy, data)
    data = _data(copy)
    data["steps"][0]["range"] = 7
    with pytest.raises(QexportError, match=r"steps\[0\]\.range is 7; the build has ranges 0\.\.3"):
        write_manifest(copy, data)


def test_nothing_outside_the_folder_is_opened_reading_and_running_traversal_attempts(base, tmp_path, opens):
    attempts = {
        "dotdot": lambda d, f: _set_model(d, "../elsewhere/step_00.onnx"),
        "absolute": lambda d, f: _set_model(d, str(tmp_path / "elsewhere" / "step_00.onnx")),
        "weights": lambda d, f: d["files"].update(weights="../elsewhere/w.bin"),
        "symlink": lambda d, f: _symlink(f, "step_00.onnx", tmp_path / "elsewhere" / "step_00.onnx"),
        "named_symlink": lambda d, f: _named_symlink(d, f, tmp_path / "elsewhere" / "step_00.onnx"),
        "external": lambda d, f: _external(f, "step_01.onnx", "../elsewhere/w.bin"),
    }
    (tmp_path / "elsewhere").mkdir()
    for name in ("step_00.onnx", "w.bin"):
        shutil.copyfile(base / name, tmp_path / "elsewhere" / name)
    for what, attack in attempts.items():
        folder = Path(shutil.copytree(base, tmp_path / what))
        data = _data(folder)
        attack(data, folder)
        write_manifest(folder, data) if what == "external" else _reseal(folder, data)
        opens.paths.clear()
        opens.active = True
        try:
            with pytest.raises(QexportError):
                run_build(folder)
        finally:
            opens.active = False
        assert opens.paths, what  # the hook saw the manifest being read
        assert not opens.outside(folder), (what, opens.outside(folder))
        assert not any("/elsewhere/" in p for p in opens.paths), what


def _set_model(data: dict, name: str) -> None:
    data["steps"][0]["model"] = data["ranges"][0]["model"] = name


def _symlink(folder: Path, name: str, target: Path) -> None:
    (folder / name).unlink()
    (folder / name).symlink_to(target)


def _named_symlink(data: dict, folder: Path, target: Path) -> None:
    (folder / "evil.onnx").symlink_to(target)
    _set_model(data, "evil.onnx")
    data["integrity"]["files"]["evil.onnx"] = data["integrity"]["files"]["step_00.onnx"]


def test_a_legality_file_with_a_wrong_field_is_one_line(copy):
    reports = json.loads((copy / "legality.json").read_text())
    reports[1]["nodes"][0]["status"] = "fast"
    (copy / "legality.json").write_text(json.dumps(reports))
    with pytest.raises(QexportError) as err:
        read_legality(copy / "legality.json")
    assert str(err.value).startswith(f"{copy / 'legality.json'}: field '[1].nodes[0].status': input should be ")


def test_the_committed_json_schema_is_the_models():
    committed = json.loads((REPO / "docs" / "manifest.schema.json").read_text())
    assert committed == Manifest.model_json_schema(by_alias=True, mode="validation")
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "manifest_schema.py"), "--check"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_scheduler_block_of_the_largest_size_is_read_in_linear_time():
    import time

    from qexport.runtime.scheduler import EdgeScheduler

    steps = [{"timestep": 1.0, "input_scale": 1.0, "x": [[j, 1e-3] for j in range(i + 1)], "out": [[i, 1.0]],
              "noise": 0.0} for i in range(1000)]  # fmt: skip
    start = time.perf_counter()
    EdgeScheduler({"class": "DDIMScheduler", "init_noise_sigma": 1.0, "steps": steps}, seed=0)
    assert time.perf_counter() - start < 2.0  # half a million terms: each looked at once
    steps[3]["out"] = [[4, 1.0]]
    with pytest.raises(QexportError, match="scheduler block reads a future step"):
        EdgeScheduler({"class": "DDIMScheduler", "init_noise_sigma": 1.0, "steps": steps}, seed=0)


def test_an_external_data_location_that_is_not_utf8_is_one_clear_error(copy):
    blob = (copy / "step_00.onnx").read_bytes()
    (copy / "step_00.onnx").write_bytes(blob.replace(b"w.bin", b"w.\xffin", 1))  # protobuf gives it back as bytes
    with pytest.raises(QexportError, match=r"names the external data of tensor .* 'w\.\ufffdin': a file name with "):
        model_path(copy, "step_00.onnx")
