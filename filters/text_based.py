"""DataComp's ``text_based`` baseline and the caption filter of its ``image_based`` baseline.

text-based (``baselines/apply_filter.py``): fastText says English (no length rule), and some
whitespace-split word of the caption has a first WordNet synset whose offset is in DataComp's
ImageNet-21k synset list. "First synset" is nltk 3.8.1's ``wordnet.synsets(word)[0]``
(DataComp's pinned nltk): the word lower-cased, parts of speech in the order noun, verb,
adjective, adverb, each with nltk's morphology (exception lists, then suffix rules, applied
again and again until a form is found: nltk >= 3.9 stops after one round, so we read WordNet
ourselves instead of depending on which nltk is installed). DataComp compares the bare offset,
so a verb or adjective synset whose offset equals a listed noun's also matches;
``match_pos=True`` is the corrected variant that only matches noun synsets.

WordNet 3.0 is read from its data files (Debian: ``apt-get install wordnet-base`` puts them
in /usr/share/wordnet; nltk's ``corpora/wordnet`` folder works too).

caption filter (``caption_filter``): fastText says English, more than 1 token by fastText's
own tokenizer (split on ASCII space, \\n, \\r, \\t, \\v, \\f, \\0; every newline adds an
end-of-sentence token) and more than 5 characters.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from conceptprune.errors import ConfigError
from conceptprune.keeplist import UidCollector
from conceptprune.pool import Pool

from .base import FilterResult, as_within
from .langid import LanguageId

# -- the caption filter ----------------------------------------------------------------------

_FASTTEXT_WORD = re.compile(r"[^ \n\r\t\v\f\0]+")


def fasttext_token_count(text: str) -> int:
    """``len(fasttext.tokenize(text))``: whitespace-separated words plus one ``</s>`` a newline."""
    return len(_FASTTEXT_WORD.findall(text)) + text.count("\n")


def caption_filter_mask(texts: list, lid: LanguageId) -> np.ndarray:
    texts = [t or "" for t in texts]
    english = np.array([lang == "en" for lang in lid.predict(texts)], dtype=bool)
    long_enough = np.array([fasttext_token_count(t) > 1 and len(t) > 5 for t in texts], dtype=bool)
    return english & long_enough


# -- WordNet ---------------------------------------------------------------------------------

POS_ORDER = ("n", "v", "a", "r")  # nltk's POS_LIST
_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_RULES = {  # nltk's MORPHOLOGICAL_SUBSTITUTIONS
    "n": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"),
          ("shes", "sh"), ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
          ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}
_VERSION = re.compile(r"WordNet (\d+(?:\.\d+)?) Copyright")
WORDNET_DIRS = ("/usr/share/wordnet", "~/nltk_data/corpora/wordnet", "/usr/share/nltk_data/corpora/wordnet",
                "/usr/local/share/nltk_data/corpora/wordnet")


def find_wordnet(path: str | os.PathLike | None = None) -> Path:
    """A folder with WordNet 3.0's index.* and *.exc files."""
    candidates = [path] if path else [os.environ.get("WORDNET_DIR"), *WORDNET_DIRS]
    for c in candidates:
        if c and (Path(os.path.expanduser(str(c))) / "index.noun").is_file():
            return Path(os.path.expanduser(str(c)))
    if path:
        raise ConfigError(f"--wordnet {path}: no index.noun there (a WordNet 3.0 dict folder is needed)")
    raise ConfigError("WordNet 3.0 not found: apt-get install wordnet-base (puts it in /usr/share/wordnet), "
                      "or pass --wordnet DIR / set WORDNET_DIR")


class WordNet:
    """First-synset lookup over WordNet's index files, as nltk 3.8.1's ``synsets(word)[0]``."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = find_wordnet(path)
        self.index: dict[str, dict[str, list[int]]] = {}
        self.exceptions: dict[str, dict[str, list[str]]] = {}
        for pos, name in _FILES.items():
            self._read_index(pos, self.path / f"index.{name}")
            self.exceptions[pos] = self._read_exceptions(self.path / f"{name}.exc")
        self.first_synset = lru_cache(maxsize=1 << 20)(self._first_synset)

    def _read_index(self, pos: str, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"{path}: missing from the WordNet folder")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.startswith(" "):  # the licence header
                    m = _VERSION.search(line)
                    if m and m.group(1) != "3.0":
                        raise ConfigError(f"{path}: WordNet {m.group(1)}, but ImageNet's synset ids are "
                                          "WordNet 3.0 offsets")
                    continue
                self._parse_index_line(line.split(), pos, path, i)

    def _parse_index_line(self, t: list[str], pos: str, path: Path, i: int) -> None:
        try:
            n_synsets, n_pointers = int(t[2]), int(t[3])
            offsets = [int(x) for x in t[6 + n_pointers: 6 + n_pointers + n_synsets]]
            if n_synsets < 1 or len(offsets) != n_synsets:
                raise ValueError("synset count does not match")
        except (IndexError, ValueError) as e:
            raise ConfigError(f"{path}, line {i}: not a WordNet index line ({e})") from None
        self.index.setdefault(t[0], {})[t[1]] = offsets

    @staticmethod
    def _read_exceptions(path: Path) -> dict[str, list[str]]:
        if not path.is_file():
            raise ConfigError(f"{path}: missing from the WordNet folder")
        out = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                t = line.split()
                if t:
                    out[t[0]] = t[1:]
        return out

    def _in_db(self, forms: list[str], pos: str) -> list[str]:
        return list(dict.fromkeys(f for f in forms if pos in self.index.get(f, ())))

    def morphy(self, form: str, pos: str) -> list[str]:
        """nltk 3.8.1's ``_morphy``: base forms of ``form`` present in WordNet for ``pos``."""
        if form in self.exceptions[pos]:
            return self._in_db([form] + self.exceptions[pos][form], pos)
        rules = _RULES[pos]

        def apply(forms):
            return [f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

        forms = apply([form])
        found = self._in_db([form] + forms, pos)
        while not found and forms:
            forms = apply(forms)
            found = self._in_db(forms, pos)
        return found

    def _first_synset(self, word: str) -> tuple[str, int] | None:
        """(pos, offset) of ``synsets(word)[0]``, or None when the word has no synset."""
        lemma = word.lower()
        for pos in POS_ORDER:
            for form in self.morphy(lemma, pos):
                offsets = self.index[form].get(pos)
                if offsets:
                    return pos, offsets[0]
        return None


def read_synset_ids(path: str | os.PathLike) -> set[int]:
    """DataComp's ``imagenet21k_wordnet_ids.txt``: one ``n########`` a line -> the offsets."""
    out = set()
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                s = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConfigError(f"{path}, line {i}: not UTF-8 text (a WordNet id list is one n######## "
                                  "a line)") from None
            if not s:
                continue
            if len(s) < 2 or not s[1:].isdigit():
                raise ConfigError(f"{path}, line {i}: {s[:40]!r} is not a WordNet id like n01440764")
            out.add(int(s[1:]))
    if not out:
        raise ConfigError(f"{path}: no synset ids")
    return out


def has_entity(text: str, wn: WordNet, ids: set[int], match_pos: bool = False) -> bool:
    for word in text.split():
        first = wn.first_synset(word)
        if first is not None and first[1] in ids and (not match_pos or first[0] == "n"):
            return True
    return False


def text_based(pool: Pool, *, within=None, lid_model=None, synsets=None, wordnet=None,
               match_pos: bool = False, assets_dir=None, assets_url=None) -> FilterResult:
    """``synsets``: the ImageNet-21k id list (default: DataComp's, fetched into its cache)."""
    from .assets import imagenet21k_ids

    # the synset list first (offline, DataComp's is fetched only if cached: assets.offline), then
    # WordNet and the language model: every input resolved before the pool is read
    ids_path = Path(synsets) if synsets else imagenet21k_ids(assets_dir, assets_url)
    if not ids_path.is_file():
        raise ConfigError(f"--synsets {ids_path}: file not found")
    ids = read_synset_ids(ids_path)
    wn = WordNet(wordnet)
    lid = LanguageId(lid_model)
    within = as_within(within)
    kept, n = UidCollector(), 0
    reasons = {"not_english": 0, "no_imagenet21k_word": 0}
    for chunk in pool.iter_chunks(["text"], progress="text-based filter"):
        cand = within.mask(chunk.uids)
        n += int(cand.sum())
        texts = [t or "" for t in chunk.pylist("text")]
        english = np.array([lang == "en" for lang in lid.predict(texts)], dtype=bool)
        entity = np.array([bool(c) and e and has_entity(t, wn, ids, match_pos)
                           for t, c, e in zip(texts, cand, english)], dtype=bool)
        reasons["not_english"] += int((cand & ~english).sum())
        reasons["no_imagenet21k_word"] += int((cand & english & ~entity).sum())
        kept.add(chunk.uids[cand & english & entity])
    within.check()
    params = {"lid_model": str(lid.path), "synsets": str(ids_path), "synset_count": len(ids),
              "wordnet": str(wn.path), "match_pos": match_pos}
    return FilterResult("text-based", kept, params, {"pool": pool.rows, "candidates": n},
                        stats={"rejected_by": reasons})


from .assets import ASSET_PARAMS  # noqa: E402
from .registry import FilterSpec, Param, register  # noqa: E402

register(FilterSpec(
    "text-based", "DataComp's text-based filter: English caption (fastText) with a word whose first WordNet synset "
                  "is an ImageNet-21k class", text_based, jobs=False,
    params=(Param("--lid-model", help="fastText language-ID model (default: the bundled lid.176.ftz; 'datacomp': "
                                      "DataComp's lid.176.bin, fetched once into ~/.cache/fasttext)"),
            Param("--synsets", metavar="IDS.txt",
                  help="WordNet ids to match, one n######## a line (default: DataComp's imagenet21k_wordnet_ids.txt)"),
            Param("--wordnet", metavar="DIR",
                  help="WordNet 3.0 dict folder (default: $WORDNET_DIR, else /usr/share/wordnet from wordnet-base)"),
            Param("--match-pos", action="store_true",
                  help="corrected variant: only noun synsets match (DataComp compares the bare offset)"))
    + ASSET_PARAMS))
