"""qexport.verification: checks emitted models against the simulation and FP, evaluates accuracy, writes the report."""
