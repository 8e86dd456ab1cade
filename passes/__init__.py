"""qexport.passes: ONNX graph transforms ``(graph, config, target) -> graph``; never imports torch."""
