"""onnxruntime's int8 products are exact on any x86 CPU: where its uint8 x int8 kernels would clamp
pair sums to 16 bits (no VNNI, no AMX), runtime.cpu asks for its exact mode."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qexport.runtime.cpu import EXACT_INT8, saturates_int8
from qexport.runtime.loop import session_options


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    return path


def test_x86_flags_decide_whether_pair_sums_clamp(tmp_path, monkeypatch):
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    saturates = saturates_int8.__wrapped__  # the uncached function: each case reads its own file
    assert saturates(_cpuinfo(tmp_path, "fpu sse2 avx2 fma"))
    assert saturates(_cpuinfo(tmp_path, "avx2 avx512f avx512bw"))  # AVX-512 without VNNI clamps too
    assert not saturates(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni"))
    assert not saturates(_cpuinfo(tmp_path, "avx2 avx_vnni"))
    assert not saturates(_cpuinfo(tmp_path, "avx2 amx_int8 amx_tile"))
    assert saturates(tmp_path / "missing")  # unreadable: the safe side
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert not saturates(_cpuinfo(tmp_path, "fp asimd"))


def _entry(options: ort.SessionOptions, key: str) -> str | None:
    try:
        return options.get_session_config_entry(key)
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return None


def test_session_options_ask_for_exact_int8_only_where_needed():
    """On a CPU with VNNI or AMX the key is never set, on one without it is "1"."""
    assert (_entry(session_options(), EXACT_INT8) == "1") == saturates_int8()


def _qdq_matmul(w_q: np.ndarray, a_zero: int) -> onnx.ModelProto:
    """y = DQ(Q(x)) @ DQ(w_q): uint8 activations (scale 1, zero a_zero), int8 weights (scale 1)."""
    inits = [numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.uint8(a_zero), "az"),
             numpy_helper.from_array(w_q, "w"), numpy_helper.from_array(np.ones(w_q.shape[1], np.float32), "ws"),
             numpy_helper.from_array(np.zeros(w_q.shape[1], np.int8), "wz")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "one", "az"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "one", "az"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_int8_products_that_would_clamp_are_exact():
    rng = np.random.default_rng(0)
    w_q = rng.choice(np.array([-127, 127], np.int8), size=(64, 16))
    x = np.where(w_q[:, :1].T > 0, 255.0, 0.0).repeat(4, 0).astype(np.float32)  # 255 x 127 pairs: 64,770 > 32,767
    x[1:] = rng.integers(0, 256, size=(3, 64))
    session = ort.InferenceSession(_qdq_matmul(w_q, 0).SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    y = session.run(None, {"x": x})[0]
    exact = x.astype(np.int64) @ w_q.astype(np.int64)
    assert np.abs(exact).max() > 32767 * 2  # large enough that clamped pair sums would show
    np.testing.assert_array_equal(y, exact.astype(np.float32))  # integers below 2**24: exact in float32
