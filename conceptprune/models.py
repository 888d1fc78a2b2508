"""Model configs shipped with conceptprune, registered with open_clip.

``cp-tiny-vit``: a ~1.7M-parameter CLIP (ViT on 32 px images, 2+2 layers) that trains on a
CPU in seconds; the ``tiny`` scale, the demo and the tests use it. open_clip's registry is
per process, so every process that builds a model calls :func:`register` first.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY = "cp-tiny-vit"


def register() -> None:
    import open_clip

    if TINY not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
