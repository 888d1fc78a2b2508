"""Evaluation: DataComp's 38-task zero-shot suite, results files and comparison with the baselines."""
