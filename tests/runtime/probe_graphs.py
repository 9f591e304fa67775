"""Builds the bandwidth probe graphs shipped in megaedge/assets/probes (the runtime cannot import onnx to build
them itself). ``python -m tests.runtime.probe_graphs`` rewrites them; test_bench checks the shipped ones match."""

from __future__ import annotations

from megaedge.runtime import device_bandwidth as probes


def build() -> dict[str, bytes]:
    from onnx import TensorProto, helper

    def model(nodes, inputs, outputs, name):
        graph = helper.make_graph(nodes, name, inputs, outputs)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="megaedge")
        m.ir_version = 8  # loadable by onnxruntime releases back to 1.14 (JetPack images lag)
        return m.SerializeToString(deterministic=True)

    f32 = TensorProto.FLOAT
    gemv = model([helper.make_node("MatMul", ["vector", "matrix"], ["product"])],
                 [helper.make_tensor_value_info("vector", f32, [1, "rows"]),
                  helper.make_tensor_value_info("matrix", f32, ["rows", probes.GEMV_COLUMNS])],
                 [helper.make_tensor_value_info("product", f32, [1, probes.GEMV_COLUMNS])], "gemv_probe")
    relu = model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", f32, ["n"])],
                 [helper.make_tensor_value_info("y", f32, ["n"])], "copy_probe")
    return {probes.GEMV_PROBE: gemv, probes.COPY_PROBE: relu}


if __name__ == "__main__":
    probes.PROBE_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in build().items():
        (probes.PROBE_DIR / name).write_bytes(data)
        print(f"wrote {probes.PROBE_DIR / name} ({len(data)} bytes)")
