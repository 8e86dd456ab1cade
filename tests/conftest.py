import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smoke_models(tmp_path_factory):
    """Both built-in architectures trained for 3 CPU steps by the real training script."""
    from qexport.models import train

    root = tmp_path_factory.mktemp("smoke")
    for name in ("tiny-latte", "tiny-dit"):
        train.main(["--model", name, "--out", str(root / name), "--smoke"])
    return root
