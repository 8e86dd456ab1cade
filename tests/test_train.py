import json

from qexport.models.registry import load_model
from qexport.models.sampler import SamplingConfig, sample


def test_smoke_training_writes_a_loadable_diffusers_folder(smoke_models):
    for name, cls in (("tiny-latte", "LatteTransformer3DModel"), ("tiny-dit", "DiTTransformer2DModel")):
        folder = smoke_models / name
        record = json.loads((folder / "training.json").read_text())
        assert record["steps"] == 3 and record["final_loss"] > 0
        assert record["train_config"]["seed"] == 0 and record["transformer_config"]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["transformer"] == ["diffusers", cls] and index["qexport"]["pixel_latents"] is True
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        assert weights.stat().st_size < 0.6 * 4 * index["qexport"]["parameters"]  # stored in fp16
        adapter = load_model(f"diffusers:{folder}")
        assert adapter.class_name == cls
        prompt = "a red circle moving left" if name == "tiny-latte" else "red circle"
        latents = sample(adapter, adapter.conditioner.encode([prompt]), [0], SamplingConfig(steps=2))
        clip = adapter.decode(latents)
        assert clip.shape == ((1, 16, 32, 32, 3) if name == "tiny-latte" else (1, 32, 32, 3))
