"""DataComp's baseline assets: fetched, checked and loaded the way DataComp's own code does.

DataComp (``baselines/utils.py: download``) keeps them as release assets of its baseline-assets
repository, downloads each once with ``urllib`` into ``~/.cache/datacomp/<name>.pt`` (every
asset, even the text file, gets the ``.pt`` name), checks its SHA-256, and downloads again
when a cached copy does not match. We use the same names, checksums and cache folder, so a
cache filled by DataComp's scripts is reused as is. ``CONCEPTPRUNE_DATACOMP_ASSETS_URL``
(or ``base_url=``) points the downloads at a mirror.

Loading: ``torch.load(weights_only=True)`` with numpy's array-rebuilding functions allowed.
torch's weights-only unpickler does not read pickle protocol 4, which DataComp's centroid
script writes (``torch.save(centroids, path, pickle_protocol=4)``); such a file is read by an
equally restricted unpickler that admits numpy arrays and nothing else.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptprune.atomic import atomic_open, file_digest
from conceptprune.errors import ConfigError

log = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/sagadre/datacomp_baseline_assets/releases/download/v0.1.0-alpha"
URL_ENV = "CONCEPTPRUNE_DATACOMP_ASSETS_URL"
DIR_ENV = "CONCEPTPRUNE_DATACOMP_ASSETS"
SCALES = ("small", "medium", "large", "xlarge")


@dataclass(frozen=True)
class Asset:
    name: str  # DataComp's key, also its cache file name (<name>.pt)
    filename: str  # the release asset's file name
    sha256: str
    url: str | None = None  # where it is, when not on the release page
    cache_name: str | None = None  # DataComp's cache file name, when not <name>.pt
    cache_root: str | None = None  # DataComp's cache folder, when not ~/.cache/datacomp

    @property
    def cached_as(self) -> str:
        return self.cache_name or f"{self.name}.pt"


ASSETS = {a.name: a for a in [
    Asset("imagenet21k_wordnet_ids", "imagenet21k_wordnet_ids.txt",
          "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"),
    Asset("in1k_clip_vit_l14_0", "in1k_clip_vit_l14_0.pt",
          "304990fd492f40ba90072b80af78d6e8edcab9d042476ef513e03441cf53743b"),
    Asset("in1k_clip_vit_l14_1", "in1k_clip_vit_l14_1.pt",
          "72f008e6aa3bfb54174fa322963215337f843fc90fd642a9dccc815dd9e7ee76"),
    Asset("in1k_clip_vit_l14_2", "in1k_clip_vit_l14_2.pt",
          "83c3cc6503b8a50a22cac7023ca6cd61b130ab9725db2a7519f1bec5cabf5493"),
    Asset("in1k_clip_vit_l14_3", "in1k_clip_vit_l14_3.pt",
          "83faa289f847799ddcd438e5b74df1cb5973c345674896d10ba31ea48bc63804"),
    Asset("in1k_clip_vit_l14_4", "in1k_clip_vit_l14_4.pt",
          "067a45f4a140a93371876510a2fd9198a89ac1d194ae4063a51b45a6da69cadf"),
    Asset("small_centroids", "small_centroids_l14.pt",
          "23c66a05e49ad77283c1e2b33355c7eb088ac332a944c97ff85d5dfd48a5b251"),
    Asset("medium_centroids", "medium_centroids_l14.pt",
          "028b1721b1d0f139c565b6b0ac99f8a1756f4bae89c36b0ec6d1c6ea9b6f112d"),
    Asset("large_centroids", "large_centroids_l14.pt",
          "04eeab1069d3540c246cf7ce69323147351a474017fc472e4c50a018ca32240b"),
    Asset("xlarge_centroids", "xlarge_centroids_l14.pt",
          "3f62e5f8ae3a715ce84e422846fcfce1536d184455ea234790c4a6465c4c6726"),
    # DataComp's language-ID model (fastText lid.176.bin; DataComp caches it in ~/.cache/fasttext)
    Asset("fasttext", "lid.176.bin", "7e69ec5451bc261cc7844e49e4792a85d7f09c06789ec800fc4a44aec362764e",
          url="https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin", cache_name="lid.176.bin",
          cache_root="~/.cache/fasttext"),
]}
IN1K_PARTS = tuple(f"in1k_clip_vit_l14_{i}" for i in range(5))


def cache_dir(root: str | os.PathLike | None = None, asset: Asset | None = None) -> Path:
    default = (asset.cache_root if asset else None) or "~/.cache/datacomp"
    return Path(os.path.expanduser(str(root or os.environ.get(DIR_ENV) or default)))


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256")


def fetch(name: str, root: str | os.PathLike | None = None, base_url: str | None = None) -> Path:
    """Path of a checked copy of asset ``name``, downloaded into the cache if needed."""
    if name not in ASSETS:
        raise ConfigError(f"unknown DataComp asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    target = cache_dir(root, asset) / asset.cached_as
    if target.exists() and not target.is_file():
        raise ConfigError(f"{target} exists and is not a regular file")
    if target.is_file():
        if sha256_of(target) == asset.sha256:
            return target
        log.warning("%s exists but its SHA-256 does not match; downloading it again", target)
    mirror = base_url or os.environ.get(URL_ENV)
    url = f"{(mirror or RELEASE_URL).rstrip('/')}/{asset.filename}" if mirror or not asset.url else asset.url
    if offline() and not mirror:  # offline: never DataComp's servers; a mirror you name is yours to reach
        raise ConfigError(f"DataComp asset {name} is not in {target.parent} and HF_HUB_OFFLINE is set: fetch it "
                          f"where there is a network (`conceptprune filter baseline-assets`) and copy it there "
                          f"as {target.name}, or point --assets-url / {URL_ENV} at a mirror (file:// or a local server)")
    _download(url, target)
    got = sha256_of(target)
    if got != asset.sha256:
        target.unlink()
        raise ConfigError(f"{url}: downloaded, but its SHA-256 is {got}, not DataComp's {asset.sha256}")
    return target


def offline() -> bool:
    """HF_HUB_OFFLINE (or CONCEPTPRUNE_OFFLINE) asks for no network: assets are not fetched."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off")
               for v in ("HF_HUB_OFFLINE", "CONCEPTPRUNE_OFFLINE"))


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as src, atomic_open(target, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"{url}: download failed ({e}); fetch it by hand into {target.parent} "
                          f"as {target.name}, or set {URL_ENV} to a mirror") from None


# -- loading -------------------------------------------------------------------------------

def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float32)),
            type(np.dtype(np.float16)), type(np.dtype(np.int64))]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers; any other global or a torch storage is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
               ("_codecs", "encode")}  # protocol 2 writes an array's bytes through _codecs.encode

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or (module.startswith("numpy.dtypes") and name.endswith("DType")):
            mod = module.replace("numpy.core.", "numpy._core.") if hasattr(np, "_core") else module
            return super().find_class(mod, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("holds torch storages")


def load_pt(path: str | os.PathLike):
    """A torch checkpoint of tensors or numpy arrays, loaded without running arbitrary code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a readable torch file ({str(e).splitlines()[0]})") from None
    try:  # pickle protocol 4 (DataComp's centroid files): torch's weights-only reader stops on it
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise pickle.UnpicklingError("no data.pkl")
            return _NumpyOnlyUnpickler(io.BytesIO(z.read(pkl[0]))).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        reason = str(first).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ConfigError(f"{path}: refused by the weights-only loader ({reason}; {e})") from None


def _as_matrix(x, path: Path, what: str, keep_half: bool = False) -> np.ndarray:
    """float32 (or, with ``keep_half``, float16 as stored: cast batch by batch when used)."""
    if hasattr(x, "detach"):  # a torch tensor
        import torch

        x = x.detach().cpu()
        x = x.numpy() if x.dtype in (torch.float16, torch.float32) else x.float().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ConfigError(f"{path}: {what} must be a non-empty 2-D float array, got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float16 if keep_half and x.dtype == np.float16 else np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"{path}: {what} holds NaN or infinite values")
    return x


def load_matrix(path: str | os.PathLike, what: str, key: str | None = None, keep_half: bool = False) -> np.ndarray:
    """A float32 (n, d) matrix from .npy, or .pt (an array, a tensor or a dict holding ``key``)."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ConfigError(f"{path}: not a plain .npy array ({e})") from None
    else:
        x = load_pt(path)
        if isinstance(x, dict):
            if key is None or key not in x:
                raise ConfigError(f"{path}: a dict without {key!r} (keys: {sorted(map(str, x))})")
            x = x[key]
    return _as_matrix(x, path, what, keep_half)


def load_centroids(path: str | os.PathLike) -> np.ndarray:
    return load_matrix(path, "centroids", key="centroids")


def load_reference(paths, keep_half: bool = False) -> np.ndarray:
    """Reference image features (DataComp's ImageNet files hold them under ``image_features``);
    ``keep_half`` leaves float16 files in float16 (1.28M x 768 ImageNet rows: 2 GB, not 4)."""
    parts = [load_matrix(p, "reference features", key="image_features", keep_half=keep_half) for p in paths]
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise ConfigError(f"reference feature files differ in width: {sorted(dims)}")
    return np.concatenate(parts)


def datacomp_centroids(scale: str, root=None, base_url=None) -> Path:
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {list(SCALES)}, got {scale!r}")
    return fetch(f"{scale}_centroids", root, base_url)


def datacomp_lid_model(root=None, base_url=None) -> Path:
    """DataComp's exact fastText model, lid.176.bin (126 MB; the bundled default is lid.176.ftz)."""
    return fetch("fasttext", root, base_url)


def in1k_reference(root=None, base_url=None) -> list[Path]:
    return [fetch(name, root, base_url) for name in IN1K_PARTS]


def imagenet21k_ids(root=None, base_url=None) -> Path:
    return fetch("imagenet21k_wordnet_ids", root, base_url)


# -- the asset flags (text-based, image-based) and the baseline-assets tool ------------------------

from .registry import FilterSpec, Param, register  # noqa: E402

ASSET_PARAMS = (
    Param("--assets-dir", help="cache of DataComp's baseline assets (default ~/.cache/datacomp, DataComp's own)"),
    Param("--assets-url", help="download DataComp's assets from this mirror instead of its release page"),
)


def _assets_command(a) -> None:
    from conceptprune.errors import ConfigError

    unknown = [n for n in a.names if n not in ASSETS]
    if unknown:
        raise ConfigError(f"unknown asset {unknown[0]!r}; known: {', '.join(ASSETS)}")
    for name in a.names or list(ASSETS):
        if a.list:
            path = cache_dir(a.assets_dir, ASSETS[name]) / ASSETS[name].cached_as
            print(f"{name}\t{ASSETS[name].filename}\t{path if path.is_file() else 'missing'}")
        else:
            print(fetch(name, a.assets_dir, a.assets_url))


register(FilterSpec(
    "baseline-assets", "download DataComp's baseline assets (centroids, ImageNet-1k features, synset ids)",
    command=_assets_command, common=False, jobs=False,
    params=(Param("names", nargs="*", help="asset names (default: all; --list shows them)"),
            Param("--list", action="store_true", help="list the assets and whether they are in the cache"))
    + ASSET_PARAMS))
