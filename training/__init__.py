"""Training: OpenCLIP on resharded keep-lists, DataComp recipe, launched through the slurm/ job layer."""
