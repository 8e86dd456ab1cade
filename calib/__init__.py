"""qexport.calib: observers, forward hooks on the sampling loop, the .qstats store (to come)."""
