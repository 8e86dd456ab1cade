"""qexport.targets: NPU/runtime profiles as plain data, and legality checks (to come)."""
