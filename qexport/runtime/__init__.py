"""qexport.runtime: the edge loop over emitted models. numpy + onnxruntime only (never torch)."""
