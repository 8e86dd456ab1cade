"""qexport: static-quantization export of diffusion transformers to ONNX for NPUs."""

__version__ = "0.1.0"
