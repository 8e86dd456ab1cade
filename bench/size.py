"""Size of emitted models: bytes per parameter of W8A8 / W4A8 builds (whole denoiser, and the
quantized linears alone with their scales and zero points), with the float-kept layers' weights
stored int8 (the default on onnxruntime CPU) and fp32 side by side, and the disk of 20 per-step
models with and without weight sharing.

    python bench/size.py [--models tiny-latte,tiny-dit,dit-b-2]

Targets: W8 <= 1.05 bytes/param, W4 <= 0.55 bytes/param, scales included.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
from peers import folder_bytes
from qexport.calib.run import CalibConfig, calibrate
from qexport.calib.store import save
from qexport.exporter.build import BuildConfig, build
from qexport.passes.plan import Smooth

from qexport.models import shapes
from qexport.models.registry import ModelRequest, load_model
from qexport.models.sampler import SamplingConfig
from qexport.recipe import basic_recipe, with_settings

TARGET = {8: 1.05, 4: 0.55}


def quantized_bytes(model_path: Path) -> tuple[int, int]:
    """(bytes of every quantized layer's integer weight, scale and zero point; their weight count)."""
    model = onnx.load(str(model_path), load_external_data=True)
    nbytes, count = 0, 0
    for init in model.graph.initializer:
        role = init.name.partition(":")[2]
        if init.name.startswith("L") and role in ("w_q", "w_scale", "w_zero"):
            nbytes += len(init.raw_data) if init.HasField("raw_data") else onnx.numpy_helper.to_array(init).nbytes
            if role == "w_q":
                n = 1
                for d in init.dims:
                    n *= d
                count += n
    return nbytes, count


def calibrate_small(name: str, work: Path, steps: int) -> Path:
    adapter = load_model(name)
    pool = shapes.class_names() if adapter.conditioner.kind == "label" else shapes.eval_prompts()
    prompts = tuple(pool[::6][:4]) if name in ("tiny-latte", "tiny-dit") else ("1", "2")  # full-size: class ids
    stats = work / "calib.qstats"
    save(calibrate(adapter, CalibConfig(prompts=prompts, sampling=SamplingConfig(steps=steps), batch_size=4)).stats,
         stats)  # fmt: skip
    return stats


def bytes_table(models: list[str], work: Path) -> None:
    print(f"{'model':<12}{'bits':>6}{'float layers':>14}{'params':>10}{'quantized':>11}{'MiB':>8}"
          f"{'B/param all':>13}{'B/param quantized':>19}{'target':>8}")  # fmt: skip
    for name in models:
        steps = 20 if name.startswith("tiny") else 2
        stats = calibrate_small(name, work / name, steps)
        params = load_model(name).num_parameters
        for w, kept in ((8, "int8"), (8, "fp32"), (4, "int8"), (4, "fp32")):
            out = work / name / f"w{w}{kept}"
            recipe = basic_recipe(w_bits=w, smooth="asq", time_ranges=1)
            recipe = with_settings(recipe, [f"float_layers.weights={kept}"])
            build(stats, out, BuildConfig(recipe=recipe), model=ModelRequest(model=name))  # the model named here
            total = folder_bytes(out)
            qbytes, qcount = quantized_bytes(out / "range_00.onnx")
            print(f"{name:<12}{f'W{w}A8':>6}{kept:>14}{params / 1e6:>9.2f}M{qcount / 1e6:>10.2f}M{total / 2**20:>8.2f}"
                  f"{total / params:>13.3f}{qbytes / qcount:>19.3f}{TARGET[w]:>8.2f}")  # fmt: skip
            shutil.rmtree(out)


def sharing_table(work: Path) -> None:
    stats = work / "tiny-latte" / "calib.qstats"
    if not stats.is_file():
        stats = calibrate_small("tiny-latte", work / "tiny-latte", 20)
    print("\ntiny-latte W8A8, 20 per-step models (timestep-wise) vs one model")
    print(f"{'build':<22}{'models':>7}{'disk MiB':>10}{'no sharing MiB':>16}{'x one model':>13}")
    one = None
    for label, smooth, ranges in (("ASQ, 1 model", Smooth.ASQ, 1), ("ASQ +TSW", Smooth.ASQ, None),
                                  ("none +TSW", Smooth.NONE, None), ("TSQ +TSW", Smooth.TSQ, None)):  # fmt: skip
        out = work / "tsw" / label.replace(" ", "_").replace(",", "").replace("+", "p")
        build(stats, out, BuildConfig(recipe=basic_recipe(smooth=smooth.value, time_ranges=ranges)))
        manifest = json.loads((out / "manifest.json").read_text())
        disk = folder_bytes(out)
        protos = disk - manifest["files"]["weights_bytes"]
        unshared = protos + manifest["files"]["weights_bytes_without_sharing"]
        one = one or disk
        print(
            f"{label:<22}{len(manifest['ranges']):>7}{disk / 2**20:>10.2f}{unshared / 2**20:>16.2f}{disk / one:>13.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-latte,tiny-dit,dit-b-2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qexport-size"))
    a = parser.parse_args()
    ort.set_default_logger_severity(3)
    shutil.rmtree(a.work, ignore_errors=True)
    bytes_table(a.models.split(","), a.work)
    sharing_table(a.work)


if __name__ == "__main__":
    main()
