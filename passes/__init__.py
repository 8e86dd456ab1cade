"""qexport.passes: ONNX graph transforms ``(graph, config, target) -> graph`` over onnx-graphsurgeon,
with the numpy math they apply (quantizer, smoothing plan). Never imports torch."""
