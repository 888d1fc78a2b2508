"""``conceptprune report`` / ``conceptprune explain``: what a filter chain did, and why.

- ``index``: a uid -> (shard, offset, size) index of webdataset tars (sorted arrays,
  searched with ``searchsorted``; built once from the tar headers, reused);
- ``chain``: a chain of keep-lists read with their manifests, clustering folders and
  SemDeDup results;
- ``html``: the static report folder; ``explain``: one sample's path through the chain.
"""
