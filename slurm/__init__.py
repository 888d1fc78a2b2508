"""The job layer: cluster options, submitit executors (slurm, local, debug), stages with completion markers."""
