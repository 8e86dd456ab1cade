"""Target profiles: what one runtime / NPU accepts, as plain data. Passes ask the profile;
nothing else branches on a target's name."""

from __future__ import annotations

from dataclasses import dataclass

from qexport.errors import QexportError

WEIGHT_WIDTHS = (4, 8)  # W3/W4 live in int4, W5..W8 in int8
ACTIVATION_WIDTHS = (8, 16)  # A4..A8 in 8-bit types (restricted ranges), A9..A16 in 16-bit


@dataclass(frozen=True, kw_only=True)
class TargetProfile:
    """Quantization rules of one target.

    weight_storage / activation_storage map a bit width to the ONNX storage type that holds it
    (a restricted width such as W6 lives inside the next storage type up).
    """

    name: str
    description: str
    weight_storage: dict[int, str]
    weight_symmetric: bool
    activation_storage: dict[int, str]
    activation_symmetric: bool
    pow2_scales: bool
    opset: int
    quantized_ops: tuple[str, ...]
    native: tuple[tuple[int, int], ...]  # (weight storage bits, activation storage bits) run as integer kernels
    bias_full_rank: bool = False  # give each quantized MatMul's bias Add the activation's rank (see passes)
    source: str

    def weight_type(self, bits: int) -> str:
        return self._storage(self.weight_storage, bits, "weight", WEIGHT_WIDTHS)

    def activation_type(self, bits: int) -> str:
        return self._storage(self.activation_storage, bits, "activation", ACTIVATION_WIDTHS)

    def _storage(self, table: dict[int, str], bits: int, what: str, widths: tuple[int, ...]) -> str:
        """The storage of the natural width for `bits` (the smallest standard width that holds it)."""
        width = next((w for w in widths if w >= bits), None)
        if width is None or width not in table:
            has = ", ".join(str(b) for b in sorted(table))
            raise QexportError(
                f"target {self.name} cannot store {bits}-bit {what}s: it has no {width}-bit {what} type "
                f"(its {what} widths: {has})"
            )
        return table[width]

    def runs_integer(self, w_bits: int, a_bits: int) -> bool:
        w = next(b for b in WEIGHT_WIDTHS if b >= w_bits)
        a = next(b for b in ACTIVATION_WIDTHS if b >= a_bits)
        return (w, a) in self.native


ORT_CPU = TargetProfile(
    name="ort-cpu",
    description="onnxruntime CPU execution provider (MLAS)",
    weight_storage={4: "int4", 8: "int8"},
    weight_symmetric=True,
    activation_storage={8: "uint8", 16: "uint16"},
    activation_symmetric=False,
    pow2_scales=False,
    opset=21,
    quantized_ops=("MatMul",),
    native=((8, 8),),
    # a 1-D bias lets MatMulAddFusion turn MatMul+Add into Gemm before the QDQ fusion runs, and the
    # DequantizeLinear pair then stays float; a [1, 1, N] bias keeps MatMulIntegerToFloat (measured)
    bias_full_rank=True,
    source=(
        "onnxruntime docs, 'Quantize ONNX models' (QDQ format, U8S8 recommended on x86); measured with "
        "onnxruntime 1.31: W8A8 QDQ MatMul fuses to MatMulIntegerToFloat, int4 weights and 16-bit "
        "activations run as DequantizeLinear + float MatMul"
    ),
)

PROFILES: dict[str, TargetProfile] = {p.name: p for p in (ORT_CPU,)}


def get_profile(name: str) -> TargetProfile:
    if name not in PROFILES:
        raise QexportError(f"unknown target {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
