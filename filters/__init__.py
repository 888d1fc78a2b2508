"""Filtering modules: each reads a pool and returns the uids to keep.

Every filter is a plain function ``f(pool, *, ..., within=None) -> FilterResult``; the CLI
(``conceptprune filter <method>``) and :func:`run_filter` write its keep-list + manifest.
"""

from .base import FilterResult, Within, run_filter, target_count
from .clustering_config import ClusteringConfig
from .simple import keep_all, random_subset
from .clip_score import clip_score
from .basic import basic, laion2b
from .image_based import image_based
from .text_based import text_based
from .dbp import dbp
from .semdedup import semdedup
from .ssl_prototypes import ssl_prototypes
from .negcliploss import negcliploss
from .normsim import normsim
from .hkmeans import hkmeans

__all__ = ["FilterResult", "Within", "run_filter", "target_count", "ClusteringConfig", "keep_all", "random_subset",
           "clip_score", "basic", "laion2b", "image_based", "text_based", "dbp", "semdedup", "ssl_prototypes",
           "negcliploss", "normsim", "hkmeans"]
