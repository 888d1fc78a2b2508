"""``conceptprune filter`` subcommands for DataComp's text-based and image-based baselines.

Registered into :mod:`filters.cli`'s table when that module is imported.
"""

from __future__ import annotations

from .cli import _clustering_args, _clustering_config, _common, _job_args, method, output_args


def _assets_args(p):
    p.add_argument("--assets-dir", default=None,
                   help="cache of DataComp's baseline assets (default ~/.cache/datacomp, DataComp's own)")
    p.add_argument("--assets-url", default=None,
                   help="download DataComp's assets from this mirror instead of its release page")


@method("text-based", "DataComp's text-based filter: English caption (fastText) with a word whose first "
                      "WordNet synset is an ImageNet-21k class")
def _text_based(p):
    _common(p)
    p.add_argument("--lid-model", default=None,
                   help="fastText language-ID model (default: the bundled lid.176.ftz; 'datacomp': DataComp's "
                        "lid.176.bin, fetched once into ~/.cache/fasttext)")
    p.add_argument("--synsets", default=None, metavar="IDS.txt",
                   help="WordNet ids to match, one n######## a line (default: DataComp's imagenet21k_wordnet_ids.txt)")
    p.add_argument("--wordnet", default=None, metavar="DIR",
                   help="WordNet 3.0 dict folder (default: $WORDNET_DIR, else /usr/share/wordnet from wordnet-base)")
    p.add_argument("--match-pos", action="store_true",
                   help="corrected variant: only noun synsets match (DataComp compares the bare offset)")
    _assets_args(p)

    def run(a):
        from . import run_filter, text_based
        run_filter(text_based, a.pool, a.out, **output_args(a), within=a.within, lid_model=a.lid_model,
                   synsets=a.synsets, wordnet=a.wordnet, match_pos=a.match_pos, assets_dir=a.assets_dir,
                   assets_url=a.assets_url)
    return run


@method("image-based", "DataComp's image-based filter: caption filter, then keep rows whose k-means centroid "
                       "is hit by an ImageNet-1k image (image-based AND CLIP score: --within a clip-score list)")
def _image_based(p):
    _common(p)
    p.add_argument("--embedding-dir", default=None, help="folder of the npz files if not beside the parquet files")
    p.add_argument("--bad-embeddings", choices=["error", "drop"], default="error",
                   help="NaN/zero embeddings: stop with an error (default) or drop those rows (never kept)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scale", choices=["small", "medium", "large", "xlarge"],
                   help="use DataComp's centroids for this pool scale (downloaded once)")
    g.add_argument("--centroids", metavar="FILE",
                   help="your own centroids (.npy from image-based-centroids, or .pt as DataComp writes them); "
                        "or, instead of both, --clusters K / --clustering DIR: our clustering engine")
    p.add_argument("--reference", nargs="+", default=None, metavar="FILE",
                   help="reference image features (.pt holding image_features, or .npy; default: DataComp's "
                        "ImageNet-1k L/14 features, 5 files)")
    p.add_argument("--assign", choices=["dot", "l2"], default="dot",
                   help="dot (default): DataComp's argmax x.c; l2: the corrected nearest-centroid rule")
    p.add_argument("--lid-model", default=None, help="fastText language-ID model (default: bundled lid.176.ftz; 'datacomp': DataComp's lid.176.bin)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per assignment batch (default 1024)")
    p.add_argument("--device", default="auto", help="torch device for the assignment (default: cuda when present)")
    _assets_args(p)
    _clustering_args(p)
    _job_args(p)

    def run(a):
        from conceptprune.errors import ConfigError

        from . import image_based, run_filter
        engine = a.clusters is not None or a.clustering is not None
        if (a.scale is not None) + (a.centroids is not None) + engine != 1:
            raise ConfigError("image-based needs one of --scale (DataComp's centroids), --centroids FILE, "
                              "or --clusters K / --clustering DIR (our clustering engine)")
        extra = {"embedding_dir": a.embedding_dir} if a.embedding_dir else {}
        if engine:
            from conceptprune.slurm.options import executor_from_args

            extra.update(clustering=_clustering_config(a), executor=executor_from_args(a))
        run_filter(image_based, a.pool, a.out, **output_args(a), within=a.within, embedding_key="l14_img",
                   bad_embeddings=a.bad_embeddings, scale=a.scale, centroids=a.centroids, reference=a.reference,
                   assign=a.assign, lid_model=a.lid_model, batch_size=a.batch_size, device=a.device,
                   assets_dir=a.assets_dir, assets_url=a.assets_url, **extra)
    return run


@method("image-based-centroids", "build centroids for image-based with DataComp's recipe (caption filter, "
                                 "faiss L2 k-means, 20 iterations, seed 0) from your pool or a feature file")
def _centroids(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pool", help="DataComp metadata directory (its l14_img embeddings are clustered)")
    src.add_argument("--features", metavar="FILE", help="cluster these features instead (.npy, or .pt with image_features)")
    p.add_argument("--out", required=True, help="centroids .npy (a .json with the settings is written beside it)")
    p.add_argument("--clusters", type=int, required=True, help="k (DataComp's: 100000)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (default 20, DataComp's)")
    p.add_argument("--seed", type=int, default=0, help="k-means and sample seed (default 0, DataComp's)")
    p.add_argument("--train-sample", type=int, default=None,
                   help="cluster only this many candidates, those with the smallest seeded uid hashes (default all)")
    p.add_argument("--no-caption-filter", action="store_true",
                   help="cluster every candidate, not only captions passing DataComp's caption filter")
    p.add_argument("--within", default=None, metavar="PREV.npy", help="only cluster uids of this keep-list")
    p.add_argument("--lid-model", default=None, help="fastText language-ID model (default: bundled lid.176.ftz; 'datacomp': DataComp's lid.176.bin)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="faiss on GPU (default: when available)")

    def run(a):
        from .image_based import build_centroids
        meta = build_centroids(a.out, pool=a.pool, features=a.features, clusters=a.clusters, niter=a.niter,
                               seed=a.seed, caption_filter=not a.no_caption_filter, train_sample=a.train_sample,
                               within=a.within, lid_model=a.lid_model, gpu=a.gpu)
        print(f"{a.out}: {meta['k']} centroids of width {meta['dim']} from {meta['trained_on']} vectors")
    return run


@method("baseline-assets", "download DataComp's baseline assets (centroids, ImageNet-1k features, synset ids)")
def _assets(p):
    p.add_argument("names", nargs="*", help="asset names (default: all; --list shows them)")
    p.add_argument("--list", action="store_true", help="list the assets and whether they are in the cache")
    _assets_args(p)

    def run(a):
        from conceptprune.errors import ConfigError

        from .assets import ASSETS, cache_dir, fetch
        unknown = [n for n in a.names if n not in ASSETS]
        if unknown:
            raise ConfigError(f"unknown asset {unknown[0]!r}; known: {', '.join(ASSETS)}")
        for name in a.names or list(ASSETS):
            if a.list:
                path = cache_dir(a.assets_dir, ASSETS[name]) / ASSETS[name].cached_as
                print(f"{name}\t{ASSETS[name].filename}\t{path if path.is_file() else 'missing'}")
            else:
                print(fetch(name, a.assets_dir, a.assets_url))
    return run
