"""qexport.exporter: torch -> ONNX export, build orchestration, emission."""
