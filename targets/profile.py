"""Target profiles: what one runtime / NPU accepts, as plain data. Passes ask the profile;
nothing else branches on a target's name. The profiles themselves live in targets/catalog.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qexport.errors import QexportError

WEIGHT_WIDTHS = (4, 8)  # W3/W4 live in int4, W5..W8 in int8
ACTIVATION_WIDTHS = (8, 16)  # A4..A8 in 8-bit types (restricted ranges), A9..A16 in 16-bit


@dataclass(frozen=True, kw_only=True)
class TargetProfile:
    """Quantization rules of one target.

    weight_storage / activation_storage map a bit width to the ONNX storage type that holds it
    (a restricted width such as W6 lives inside the next storage type up). ``native`` lists the
    (weight storage, activation storage) pairs that this target, used as a runtime qexport runs
    the models on, executes as integer kernels (measured; empty for targets qexport cannot run).
    """

    name: str
    description: str
    weight_storage: dict[int, str]
    weight_symmetric: bool
    weight_per_channel: bool = True  # one scale per output channel (else one per tensor)
    activation_storage: dict[int, str]
    activation_symmetric: bool
    pow2_scales: bool  # every scale an exact power of two (shift-only requantization)
    opset: int  # the default-domain opset the emitted models carry
    quantized_ops: tuple[str, ...]  # op types the target runs on integer inputs
    static_shapes: bool = True  # every graph input and output has fixed dimensions
    float_ops: str  # where nodes that stay float run on this target
    bias: str  # how the bias of a quantized linear is handled
    bias_full_rank: bool = False  # give each quantized MatMul's bias Add the activation's rank (see passes)
    closed_linears: bool = False  # each quantized linear ends in an output Q -> DQ of its input's type
    max_rank: int | None = None  # the highest tensor rank a node may read or write (None: any)
    single_input_einsum: bool = True  # whether a one-input Einsum (a permutation) runs on the target
    unsigned_norm_gamma: bool = False  # a quantized LayerNormalization scale must be stored unsigned
    fp16_soc: dict[str, str] = field(default_factory=dict)  # runtime options of the FP16-capable SoC assumed
    qnn_htp: bool = False  # compiled by Qualcomm's HTP backend: qexport contexts, run / verify --runtime qnn-htp
    integer_activations: str | None = None  # integer-only: every float activation quantized to this storage
    # how the weights of layers kept in float may be stored ("fp32"; "int8": Mul(Cast(q), scale), constants
    # a runtime folds at load); the first is what a recipe's float_layers.weights auto picks
    float_weights: tuple[str, ...] = ("fp32", "int8")
    native: tuple[tuple[str, str], ...] = ()
    native_shared: tuple[tuple[str, str], ...] = ()  # of those, pairs that fuse when several MatMuls share the input
    native_attention: tuple[str, ...] = ()  # activation storages whose activation x activation MatMul runs integer
    # run-time activation quantizers (passes.techniques.dynamic) the runtime computes: "token", "tensor"; none
    # on an NPU, which fixes every scale at build time. native_dynamic: those it runs on an integer kernel
    dynamic_activations: tuple[str, ...] = ()
    native_dynamic: tuple[str, ...] = ()
    blocked_weights: tuple[str, ...] = ()  # weight storages whose blocked (group-wise) DequantizeLinear it runs
    online_transforms: tuple[str, ...] = ("hadamard", "duquant")  # online_rotation.transform values it runs
    # whether a linear whose weight is decoded from codes by a lookup (codebook_weights, twin_log_weights)
    # still runs on its quantized input (onnxruntime CPU: a float MatMul on the QDQ input, counted emulated)
    lookup_weights: bool = True
    notes: tuple[str, ...] = ()
    source: str

    def check_htp(self) -> None:
        """Refuse a build for a target that Qualcomm's HTP backend does not compile (contexts, run and
        verify on qnn-htp)."""
        if not self.qnn_htp:
            raise QexportError(f"a build for target {self.name} does not run on the HTP backend; build with "
                               "--target qnn-htp (or qnn-htp-integer)")  # fmt: skip

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
                f"(its {what} widths: {has}); pick a bit width it has or another target"
            )
        return table[width]

    def runs_integer(self, weight_type: str, activation_type: str, shared_input: bool = False) -> bool:
        """Whether this runtime runs a MatMul with these storage types as an integer kernel
        (shared_input: when its quantized input also feeds other MatMuls)."""
        return (weight_type, activation_type) in (self.native_shared if shared_input else self.native)

    def runs_attention_integer(self, activation_type: str) -> bool:
        """Whether this runtime runs a MatMul of two activations of this storage (attention's QK^T
        and PV under --quantize-attention) as an integer kernel."""
        return activation_type in self.native_attention

    def _emission_json(self) -> dict[str, Any]:
        """The emission rules a target sets (only those set, so other profiles read as before)."""
        out: dict[str, Any] = {}
        if self.closed_linears:
            out["closed_linears"] = "each quantized linear ends in an output Q -> DQ of its input's type"
        if self.max_rank is not None:
            out["max_rank"] = self.max_rank
        if not self.single_input_einsum:
            out["einsum"] = "two or more inputs (a one-input Einsum is emitted as Transpose)"
        if self.unsigned_norm_gamma:
            out["norm_gamma"] = "a quantized LayerNormalization scale is stored unsigned (uint8)"
        if self.fp16_soc:
            out["fp16_soc"] = ", ".join(f"{k}={v}" for k, v in self.fp16_soc.items())
        if self.dynamic_activations:
            out["dynamic_activations"] = list(self.dynamic_activations)
            out["integer_if_dynamic"] = list(self.native_dynamic)
        if self.blocked_weights:
            out["blocked_weights"] = list(self.blocked_weights)
        if self.integer_activations:
            out["integer_only"] = f"every float activation quantized ({self.integer_activations}, per tensor)"
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "weights": {str(k): v for k, v in self.weight_storage.items()},
            "weight_symmetric": self.weight_symmetric,
            "weight_per_channel": self.weight_per_channel,
            "activations": {str(k): v for k, v in self.activation_storage.items()},
            "activation_symmetric": self.activation_symmetric,
            "pow2_scales": self.pow2_scales,
            "opset": self.opset,
            "quantized_ops": list(self.quantized_ops),
            "static_shapes": self.static_shapes,
            "float_ops": self.float_ops,
            "bias": self.bias,
            "float_weights": list(self.float_weights),
            "integer_kernels": [f"{w} x {a}" for w, a in self.native],  # measured, where qexport runs it
            "integer_if_shared": [f"{w} x {a}" for w, a in self.native_shared],
            "integer_attention": [f"{a} x {a}" for a in self.native_attention],
            **self._emission_json(),
            "notes": list(self.notes),
            "source": self.source,
        }
