"""conceptprune: concept-based data pruning for the DataComp CLIP benchmark.

The shared core lives here: pool reading (:mod:`conceptprune.pool`), uids and keep-lists
(:mod:`conceptprune.uids`, :mod:`conceptprune.keeplist`), run manifests and the CLI.
Stages live in the subpackages ``filters``, ``training``, ``evaluation``, ``data`` and the
job layer in ``slurm``.
"""

__version__ = "0.1.0"
