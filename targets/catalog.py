"""The target profiles qexport knows, each citing the public documents its rules come from.
To add a target, add one TargetProfile here and to PROFILES (docs/targets.md)."""

from __future__ import annotations

from dataclasses import replace

from qexport.targets.profile import TargetProfile

from qexport.errors import QexportError

# every runtime below loads a [1, 1, N] bias as the same broadcast Add; onnxruntime needs that rank to
# keep MatMul + Add from turning into a Gemm before its QDQ fusion (measured), so all profiles ask for it
LINEAR_OPS = ("MatMul", "Gemm", "Conv")
FLOAT_BIAS = "float Add after the quantized MatMul ([1, 1, N], fused by the runtime into the output)"

ORT_CPU = TargetProfile(
    name="ort-cpu",
    description="onnxruntime CPU execution provider (MLAS)",
    weight_storage={4: "int4", 8: "int8"},
    weight_symmetric=True,
    activation_storage={8: "uint8", 16: "uint16"},
    activation_symmetric=False,
    pow2_scales=False,
    opset=21,
    quantized_ops=("MatMul", "Gemm", "Conv"),
    float_ops="CPU (float32)",
    bias=FLOAT_BIAS,
    # a 1-D bias lets MatMulAddFusion turn MatMul+Add into Gemm before the QDQ fusion runs, and the
    # DequantizeLinear pair then stays float; a [1, 1, N] bias keeps MatMulIntegerToFloat (measured)
    bias_full_rank=True,
    # measured with onnxruntime 1.31.1 (x86): QDQ MatMul with int8 weights (per channel or per tensor)
    # and uint8 or int8 activations fuses to MatMulIntegerToFloat; int4 weights and 16-bit activations
    # do not; int8 activations fuse only where their Q/DQ pair feeds one MatMul (q/k/v reading one
    # int8 tensor stay DequantizeLinear + float MatMul; uint8 ones fuse)
    native=(("int8", "uint8"), ("int8", "int8")),
    native_shared=(("int8", "uint8"),),
    # measured with onnxruntime 1.31.1: a QDQ MatMul of two 8-bit activations (attention's QK^T, PV) fuses
    # to MatMulIntegerToFloat, or to QLinearMatMul where a QuantizeLinear follows it (PV: QDQ propagation
    # moves the output linear's QuantizeLinear up through Transpose/Reshape); 16-bit ones stay float
    native_attention=("uint8", "int8"),
    # measured with onnxruntime 1.31.1: DynamicQuantizeLinear -> DequantizeLinear -> MatMul with an int8
    # per-channel weight fuses to DynamicQuantizeMatMul (one reader) or MatMulIntegerToFloat (q/k/v sharing
    # it); per token qexport emits MatMulInteger itself (a blocked per-token Q/DQ pair before a MatMul with a
    # bias is fused into MatMulIntegerToFloat, which then fails at run time: "a zero point must be a scalar")
    dynamic_activations=("token", "tensor"),
    native_dynamic=("token", "tensor"),
    # measured with onnxruntime 1.31.1: a blocked int4 weight DequantizeLinear (opset 21) before a MatMul runs
    # as DequantizeLinear + float MatMul; a blocked int8 one after a uint8 activation Q/DQ is fused into
    # MatMulIntegerToFloat, which then fails at run time ("per-column quantization parameter ... should
    # have same dimension"), so group-wise weights are 4-bit (or fewer) here
    blocked_weights=("int4",),
    # measured with onnxruntime 1.31.1 (x86, 2 threads): a float-kept weight stored int8 and widened by
    # Cast + Mul(scale) is folded at load into a float32 Gemm / MatMul (768 x 4608 at 2 rows: 0.17 ms, the
    # float model's 0.22; equal to numpy's q * s product within float summation order)
    float_weights=("int8", "fp32"),
    source=(
        "onnxruntime docs, 'Quantize ONNX models' (onnxruntime.ai/docs/performance/model-optimizations/"
        "quantization.html: QDQ format, U8S8 recommended on x86, int4/uint16 QDQ need opset 21); measured with "
        "onnxruntime 1.31: W8A8 QDQ MatMul (U8S8 and S8S8) fuses to MatMulIntegerToFloat, int4 weights and "
        "16-bit activations run as DequantizeLinear + float MatMul"
    ),
)

QNN_HTP = TargetProfile(
    name="qnn-htp",
    description="Qualcomm Hexagon NPU through QNN (HTP backend), e.g. onnxruntime's QNN execution provider",
    qnn_htp=True,
    weight_storage={4: "int4", 8: "int8"},
    weight_symmetric=True,
    activation_storage={8: "uint8", 16: "uint16"},
    activation_symmetric=False,
    pow2_scales=False,
    opset=21,
    quantized_ops=LINEAR_OPS,
    float_ops="HTP in FP16 where the SoC has FP16 (v73 and later), else CPU",
    bias=FLOAT_BIAS,
    bias_full_rank=True,
    # measured with onnxruntime-qnn 2.7.0 (HTP backend, x86-64 simulator): a quantized MatMul without an
    # output QuantizeLinear leaves its per-channel weight DequantizeLinear standalone, which the EP
    # refuses; Reshape/Transpose of rank 6 fail validation (error 3110); Einsum needs two inputs;
    # a QDQ LayerNormalization needs an unsigned gamma; float ops need an FP16-capable SoC (v73+)
    closed_linears=True,
    # measured (the same simulator): a MatMul reading a blocked int4 or int8 DequantizeLinear (opset 21) is
    # refused ("Unsupported nodes in QNN EP: MatMul"), a per-channel int4 one runs: no group-wise weights
    blocked_weights=(),
    # measured (the same simulator, tiny-latte W8A8 ASQ, every input rotated): the Hadamard online rotation
    # runs (64 / 64 linears, verify PASS); DuQuant's (two block MatMuls around a Gather of the channels) is
    # refused when the graph is finalized ("QNN_COMMON_ERROR_MEM_ALLOC", code 1002)
    online_transforms=("hadamard",),
    # measured (the same simulator, tiny-latte W4A8, one range): a codebook or twin-log build compiles whole
    # (826 QNN ops, no CPU node) but each of its 64 linears runs as a float (FP16) MatMul on the decoded weight
    lookup_weights=False,
    max_rank=5,
    single_input_einsum=False,
    unsigned_norm_gamma=True,
    fp16_soc={"soc_model": "57", "htp_arch": "75"},
    float_weights=("fp32",),  # int8 storage of float-kept weights is not measured on HTP (nor integer-only)
    notes=(
        "QNN HTP quantizes bias to int32 (scale = activation scale x weight scale); qexport keeps it a float Add",
        "mixed precision W8A16 (uint16 activations, int8 weights) is the QNN option for accuracy-sensitive layers",
    ),
    source=(
        "onnxruntime docs, 'QNN Execution Provider' (onnxruntime.ai/docs/execution-providers/"
        "QNN-ExecutionProvider.html: HTP runs QDQ models; uint8/uint16 activations, int8/int4 weights, 16-bit "
        "and 4-bit QDQ types need opset 21; 'Mixed precision support'); Qualcomm AI Engine Direct docs, "
        "'HTP backend' (docs.qualcomm.com 80-63442-10, htp_backend: quantized 8/16-bit activations, "
        "per-channel weights with zero offset, i.e. symmetric)"
    ),
)

# measured with onnxruntime-qnn 2.7.0 (HTP simulator, CPU fallback off, no FP16 option, the backend's default
# SoC): with every float activation quantized to uint16 (uint8 everywhere cost 16 dB), a LayerNormalization
# scale in uint8 and its bias in int32, a kept-float linear's weight in int8 per channel, the whole step
# model compiles to fixed-point QNN ops; only the graph inputs' Quantize and the output's Dequantize read float
QNN_HTP_INTEGER = replace(
    QNN_HTP,
    name="qnn-htp-integer",
    description="Qualcomm Hexagon NPU through QNN (HTP backend), integer-only: for HTPs without FP16",
    float_ops="none: every activation is quantized (uint16, per tensor); the graph's own inputs and output are "
    "quantized and dequantized at its boundary",
    bias="quantized Add after the closed linear: the bias a uint16 constant ([1, 1, N]); int32 for Conv / Gemm",
    integer_activations="uint16",
    fp16_soc={},
    notes=(
        "QNN HTP quantizes a MatMul bias to int32 inside the unit; qexport emits it as a quantized Add",
        "integer-only: data-movement ops (Reshape, Transpose, Slice, ...) keep their input's quantization "
        "parameters; float constants become quantized constants (uint16; LayerNorm scale uint8, bias int32)",
        "integer-only ranges are observed on each emitted graph itself (onnxruntime CPU, the replayed prompts)",
        "precompute_kv is refused (kv.onnx is not emitted integer-only)",
    ),
)

RYZEN_AI = TargetProfile(
    name="ryzen-ai",
    description="AMD Ryzen AI NPU, XINT8 (Vitis AI / Quark power-of-two INT8)",
    weight_storage={8: "int8"},
    weight_symmetric=True,
    weight_per_channel=False,
    activation_storage={8: "int8"},
    activation_symmetric=True,
    pow2_scales=True,
    opset=21,
    quantized_ops=LINEAR_OPS,
    float_ops="CPU (the VitisAI execution provider partitions float nodes off the NPU)",
    bias=FLOAT_BIAS,
    bias_full_rank=True,
    notes=(
        "XINT8 quantizes bias to INT32 with a power-of-two scale; qexport keeps it a float Add (runs on CPU)",
        "Ryzen AI docs recommend opset 17 (ONNX version converter); qexport emits 21 (Gelu, 16-bit QDQ types)",
        "Ryzen AI docs route transformer models to BF16 and INT8 to CNNs; this profile is the INT8 (XINT8) path",
    ),
    source=(
        "AMD Quark docs, 'INT8/INT16 Quantization for Ryzen AI' and 'Power-of-Two Scales (XINT8) Quantization' "
        "(quark.docs.amd.com/latest/supported_accelerators/ryzenai/: symmetric INT8 activations, weights and "
        "biases with power-of-two scales); MQBench docs, Vitis backend (8-bit per-tensor symmetric, "
        "power-of-two scales, [-128, 127]); Ryzen AI docs, 'Model Compatibility' (ryzenai.docs.amd.com: "
        "NPU subgraphs via the VitisAI execution provider, the rest on CPU)"
    ),
)

TENSORRT = TargetProfile(
    name="tensorrt",
    description="NVIDIA TensorRT, explicit quantization (Q/DQ)",
    weight_storage={8: "int8"},
    weight_symmetric=True,
    activation_storage={8: "int8"},
    activation_symmetric=True,
    pow2_scales=False,
    opset=21,
    quantized_ops=LINEAR_OPS,
    float_ops="GPU (FP16/FP32 kernels)",
    bias=FLOAT_BIAS,
    bias_full_rank=True,
    notes=("INT4 in TensorRT is weight-only (activations stay float), so W4A8 has no profile here",),
    source=(
        "NVIDIA TensorRT docs, 'Working with Quantized Types' and 'Explicit Quantization' (docs.nvidia.com/"
        "deeplearning/tensorrt/latest/inference-library/: symmetric quantization in signed INT8, zero point 0, "
        "activations in [-128, 127] per tensor, weights in [-127, 127] per output channel, INT4 weight-only)"
    ),
)

OPENVINO = TargetProfile(
    name="openvino",
    description="Intel OpenVINO CPU (and NPU) runtime, ONNX QDQ read as FakeQuantize",
    weight_storage={8: "int8"},
    weight_symmetric=True,
    activation_storage={8: "uint8"},
    activation_symmetric=False,
    pow2_scales=False,
    opset=21,
    quantized_ops=LINEAR_OPS,
    float_ops="CPU (float32, or bf16 where the CPU has it and no precision hint is set)",
    bias=FLOAT_BIAS,
    bias_full_rank=True,
    # measured with openvino 2026.4 CPU: a QDQ MatMul with int8 weights runs as FullyConnected in u8
    # (uint8 activations) or i8 (int8 activations), also where several MatMuls share one input
    native=(("int8", "uint8"), ("int8", "int8")),
    native_shared=(("int8", "uint8"), ("int8", "int8")),
    # measured with openvino 2026.4 CPU: a float-kept weight stored int8 and widened by Cast + Mul(scale) runs
    # as one float FullyConnected equal to onnxruntime's within float summation order (768 x 4608; a
    # DequantizeLinear in its place is 3e-3 of the output's range away: a compressed-weight kernel)
    float_weights=("int8", "fp32"),
    source=(
        "OpenVINO docs, 'Low Precision Transformations' (docs.openvino.ai/latest/openvino_docs_OV_UG_lpt.html: "
        "FakeQuantize decomposed to u8/i8 quantize + dequantize, Intel CPU runs them in low precision); NNCF "
        "docs, quantization presets (symmetric int8 weights per channel, 'mixed' preset: asymmetric "
        "activations); measured with openvino 2026.4: QDQ MatMul runs as FullyConnected in u8/i8"
    ),
)

GENERIC_INT8 = TargetProfile(
    name="generic-int8",
    description="portable 8-bit QDQ: types every ONNX QuantizeLinear (opset 13+) runtime has",
    weight_storage={8: "int8"},
    weight_symmetric=True,
    activation_storage={8: "int8"},
    activation_symmetric=False,
    pow2_scales=False,
    opset=21,
    quantized_ops=LINEAR_OPS,
    float_ops="the runtime's float kernels",
    bias=FLOAT_BIAS,
    bias_full_rank=True,
    source=(
        "ONNX operator spec, QuantizeLinear / DequantizeLinear (onnx.ai/onnx/operators: int8/uint8 since "
        "opset 13, per-axis scales); LiteRT 8-bit quantization spec (ai.google.dev/edge/litert/models/"
        "quantization_spec: int8 weights symmetric in [-127, 127] per axis, int8 activations per tensor with a "
        "zero point in [-128, 127])"
    ),
)

PROFILES: dict[str, TargetProfile] = {
    p.name: p for p in (ORT_CPU, QNN_HTP, QNN_HTP_INTEGER, RYZEN_AI, TENSORRT, OPENVINO, GENERIC_INT8)
}
RUNTIMES: dict[str, TargetProfile] = {"onnxruntime": ORT_CPU, "openvino": OPENVINO}  # what verify can run on


def get_profile(name: str) -> TargetProfile:
    """The profile named `name`.

    Raises:
        QexportError: no such target (the message lists them).
    """
    if name not in PROFILES:
        raise QexportError(f"unknown target {name!r}; choose one of {', '.join(PROFILES)} (see qexport targets)")
    return PROFILES[name]
