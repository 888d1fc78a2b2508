"""DataComp's text-based, image-based (and its CLIP-score chain) and laion2b (gcld3) baselines,
each checked against an independent computation on a generated pool; DataComp's asset
downloader against a loopback HTTP server."""

import dataclasses
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conceptprune import keeplist as K
from conceptprune.cli import main
from conceptprune.errors import ConfigError
from conceptprune.filters import assets as A
from conceptprune.filters.langid import bundled_model_path
from conceptprune.filters.text_based import WordNet, fasttext_token_count
from conceptprune.synthetic import SyntheticPoolConfig, make_pool

from conftest import read_embeddings, read_pool_frame, uid_set

WORDNET = Path("/usr/share/wordnet")
needs_wordnet = pytest.mark.skipif(not (WORDNET / "index.noun").is_file(),
                                   reason="WordNet 3.0 data absent: apt-get install wordnet-base (make deps does it)")

CAPTIONS = [
    # English, with ImageNet-21k nouns, inflections, capitals, newlines, tabs
    "a photo of a dog on the grass", "Two cats sleeping on a sofa", "a red car\nparked outside the house",
    "the dogs\tare playing in the park", "tench caught in a quiet lake", "vintage leather armchair for sale",
    "beautiful sunset over the sea", "Cheap flights to Paris this summer", "able bodied volunteers wanted today",
    "a bowl of fresh strawberries", "Mountains covered with snow", "The quick brown fox jumps over the lazy dog",
    "a photo of a dog on the beach", "close-up photograph of a bird", "Dog", "dog!", "x y", "ab\ncd", "abcdef",
    "a b", "a\u00a0b\u00a0c\u00a0dog", "click here", "wooden chairs and tables", "graduation ceremony 2019",
    # other languages
    "ein schöner Hund im Garten bei Sonnenuntergang", "un chat noir sur le canapé du salon",
    "un perro en la playa con su dueño", "il gatto dorme sul divano", "東京の夜景と高層ビル",
    "Это собака на пляже", "O cão está a correr no parque", "hond in de tuin met een bal",
    # junk
    "", "IMG_0123.JPG", "1234", "DSC0001",
]


def _rewrite_captions(pool_dir: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for path in sorted(pool_dir.glob("*.parquet")):
        t = pq.read_table(path)
        texts = [CAPTIONS[i] for i in rng.integers(len(CAPTIONS), size=t.num_rows)]
        t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        pq.write_table(t, path)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline_pool")
    make_pool(out, SyntheticPoolConfig(rows=3000, files=2, seed=11, concepts=10, block_rows=1000), progress=False)
    _rewrite_captions(out, 5)
    return out


def _run(*argv) -> None:
    assert main(["--quiet", *map(str, argv)]) == 0


# -- independent references ------------------------------------------------------------------

def _fasttext_tokens(text: str) -> int:
    """fastText's Dictionary::readWord loop, written out character by character."""
    n, word = 0, False
    for ch in text:
        if ch in " \n\r\t\v\f\0":
            if word:
                n, word = n + 1, False
            if ch == "\n":
                n += 1  # the end-of-sentence token
        else:
            word = True
    return n + word


def _fasttext_lang(texts):
    import fasttext

    m = fasttext.load_model(str(bundled_model_path()))
    return np.array([m.predict(t.replace("\n", " "), k=1)[0][0] == "__label__en" for t in texts])


def _caption_ok(texts):
    return _fasttext_lang(texts) & np.array([_fasttext_tokens(t) > 1 and len(t) > 5 for t in texts])


@pytest.fixture(scope="module")
def nltk_wordnet(tmp_path_factory):
    """DataComp's reader: nltk 3.8.1's WordNetCorpusReader over the same WordNet 3.0 files."""
    nltk = pytest.importorskip("nltk")
    if not (WORDNET / "index.noun").is_file():
        pytest.skip("WordNet 3.0 data absent: apt-get install wordnet-base")
    assert nltk.__version__ == "3.8.1", "the reference is DataComp's pinned nltk 3.8.1 (constraints.txt)"
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    d = tmp_path_factory.mktemp("wordnet")
    for f in WORDNET.iterdir():
        if f.is_file():
            (d / f.name).symlink_to(f)
    lex = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
           "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
           "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
           "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
           "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
           "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
           "adj.ppl").split()
    kind = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    (d / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{kind[n.split('.')[0]]}\n" for i, n in enumerate(lex)))
    with pytest.warns(UserWarning):  # "multilingual functions are not available": no OMW, as intended
        return WordNetCorpusReader(str(d), None)


# -- the caption filter and WordNet ------------------------------------------------------------

def test_fasttext_token_count_matches_fasttexts_tokenizer():
    texts = CAPTIONS + ["a  b", "\n", "a\n\nb", " lead", "trail ", "a\rb\vc\fd\0e", "x\u3000y", "tab\tsep"]
    assert [fasttext_token_count(t) for t in texts] == [_fasttext_tokens(t) for t in texts]
    assert fasttext_token_count("ab\ncd") == 3 and fasttext_token_count("a\u00a0b") == 1  # </s>; NBSP joins


@needs_wordnet
def test_first_synset_matches_nltk_381(nltk_wordnet, pool):
    wn = WordNet()
    lemmas = sorted(nltk_wordnet.all_lemma_names())[::40]
    words = {w for t in CAPTIONS for w in t.split()} | set(lemmas)
    words |= {w + s for w in lemmas[::3] for s in ("s", "es", "ed", "ing", "er", "est", "ss")}
    words |= {w.upper() for w in lemmas[::7]} | {"catss", "dogss", "geese", "Axes", "better"}
    differ = []
    for w in sorted(words):
        s = nltk_wordnet.synsets(w)
        ref = (s[0].pos().replace("s", "a"), s[0].offset()) if s else None
        if wn.first_synset(w) != ref:
            differ.append((w, ref, wn.first_synset(w)))
    assert not differ, differ[:5]
    assert wn.first_synset("catss") == ("n", 2121620)  # rules applied again until a form is found
    assert wn.first_synset("able")[0] == "a"


def _ids_file(tmp_path, nl) -> tuple[Path, set, set]:
    nouns = ["dog", "cat", "car", "tench", "armchair", "sunset", "strawberry", "mountain", "bird", "hond"]
    ids = {nl.synsets(w)[0].offset() for w in nouns if nl.synsets(w)}
    able = nl.synsets("able")[0]  # an adjective synset whose offset is also a noun synset's
    assert able.pos() in "as" and able.offset() in {s.offset() for s in nl.all_synsets("n")}
    ids.add(able.offset())
    path = tmp_path / "in21k_ids.txt"
    path.write_text("".join(f"n{o:08d}\n" for o in sorted(ids)) + "\n")
    noun_ids = {o for o in ids if o != able.offset()}
    return path, ids, noun_ids


@needs_wordnet
def test_text_based_matches_independent(pool, tmp_path, nltk_wordnet):
    ids_path, ids, noun_ids = _ids_file(tmp_path, nltk_wordnet)
    df = read_pool_frame(pool)
    english = _fasttext_lang(df.text)

    def first(w):
        s = nltk_wordnet.synsets(w)
        return s[0] if s else None

    def has(t, noun_only):
        return any((s := first(w)) is not None and s.offset() in ids and (not noun_only or s.pos() == "n")
                   for w in t.split())

    expect = set(df.uid[english & np.array([has(t, False) for t in df.text])])
    expect_pos = set(df.uid[english & np.array([has(t, True) for t in df.text])])
    _run("filter", "text-based", "--pool", pool, "--out", tmp_path / "text.npy", "--synsets", ids_path,
         "--wordnet", WORDNET)
    _run("filter", "text-based", "--pool", pool, "--out", tmp_path / "text_pos.npy", "--synsets", ids_path,
         "--match-pos")
    assert uid_set(K.read_keep_list(tmp_path / "text.npy")) == expect
    assert uid_set(K.read_keep_list(tmp_path / "text_pos.npy")) == expect_pos
    assert 0.1 * len(df) < len(expect_pos) < len(expect) < 0.9 * len(df)  # "able" only matches by offset


def test_wordnet_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no index.noun"):
        WordNet(tmp_path)


# -- assets: fetched from a loopback server, checked, loaded ------------------------------------

@pytest.fixture()
def served(tmp_path, monkeypatch):
    """A folder served over loopback HTTP; DataComp's checksums swapped for those of the files put there."""
    root = tmp_path / "release"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    assets = dict(A.ASSETS)
    monkeypatch.setattr(A, "ASSETS", assets)
    monkeypatch.setenv(A.URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv(A.DIR_ENV, str(tmp_path / "cache"))

    def publish(name, data: bytes):
        (root / assets[name].filename).write_bytes(data)
        assets[name] = dataclasses.replace(assets[name], sha256=hashlib.sha256(data).hexdigest())

    yield publish, root, server
    server.shutdown()


def _pt_bytes(obj, protocol=2) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    return buf.getvalue()


def test_fetch_downloads_checks_and_reuses(served, tmp_path):
    publish, root, server = served
    publish("imagenet21k_wordnet_ids", b"n02084071\n")
    path = A.fetch("imagenet21k_wordnet_ids")
    assert path == tmp_path / "cache" / "imagenet21k_wordnet_ids.pt" and path.read_bytes() == b"n02084071\n"
    (root / "imagenet21k_wordnet_ids.txt").write_bytes(b"changed on the server\n")
    assert A.fetch("imagenet21k_wordnet_ids").read_bytes() == b"n02084071\n"  # a good cached copy is kept
    path.write_bytes(b"corrupt")
    with pytest.raises(ConfigError, match="SHA-256"):  # re-downloaded, and the server's copy is wrong too
        A.fetch("imagenet21k_wordnet_ids")
    assert not path.exists()
    with pytest.raises(ConfigError, match="download failed"):
        A.fetch("medium_centroids")  # not on the server: 404
    with pytest.raises(ConfigError, match="unknown DataComp asset"):
        A.fetch("huge_centroids")


def test_lid_model_datacomp_fetches_lid176(served, tmp_path):
    from conceptprune.filters.langid import LanguageId

    publish, _, _ = served
    publish("fasttext", bundled_model_path().read_bytes())  # a real fastText model under DataComp's name
    lid = LanguageId("datacomp")
    assert lid.path == tmp_path / "cache" / "lid.176.bin"
    assert lid.predict(["a photo of a dog on the beach", "ein Hund am Strand im Sommer"]) == ["en", "de"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_load_pt_numpy_protocol4_and_refuses_code(tmp_path):
    c = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    (tmp_path / "c4.pt").write_bytes(_pt_bytes(c, protocol=4))  # DataComp's centroid files
    assert np.array_equal(A.load_centroids(tmp_path / "c4.pt"), c)
    (tmp_path / "ref.pt").write_bytes(_pt_bytes({"image_features": torch.from_numpy(c).half()}))
    assert np.array_equal(A.load_reference([tmp_path / "ref.pt"]), c.astype(np.float16).astype(np.float32))
    for proto in (2, 4):
        (tmp_path / "evil.pt").write_bytes(_pt_bytes(_Evil(), protocol=proto))
        with pytest.raises(ConfigError, match="refused"):
            A.load_pt(tmp_path / "evil.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError):
        A.load_centroids(tmp_path / "bad.pt")


# -- image-based ---------------------------------------------------------------------------------

def _assets_for(pool: Path, rng) -> tuple[np.ndarray, np.ndarray]:
    """Centroids like faiss's L2 k-means means (not unit length) and a reference set near some of them."""
    emb = read_embeddings(pool)
    c = emb[rng.choice(len(emb), 16, replace=False)] + 0.3 * rng.standard_normal((16, emb.shape[1]))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    c = (c * rng.uniform(0.55, 0.95, size=(16, 1))).astype(np.float32)
    ref = np.repeat(c[[1, 4, 7, 9, 12]], 20, axis=0) + 0.02 * rng.standard_normal((100, c.shape[1]))
    return c, ref.astype(np.float16)


def _expected_image_based(pool, c, ref, rule="dot", candidates=None):
    df = read_pool_frame(pool)
    x = read_embeddings(pool).astype(np.float64)
    c64, r64 = c.astype(np.float64), ref.astype(np.float32).astype(np.float64)

    def label(v):
        s = v @ c64.T
        return np.argmax(s - (c64 ** 2).sum(1) / 2 if rule == "l2" else s, axis=1)
    targets = set(label(r64).tolist())
    keep = _caption_ok(df.text) & np.isin(label(x), list(targets))
    if candidates is not None:
        keep &= df.uid.isin(candidates).to_numpy()
    return set(df.uid[keep])


def test_image_based_matches_independent(pool, tmp_path, served):
    publish, _, _ = served
    c, ref = _assets_for(pool, np.random.default_rng(3))
    publish("small_centroids", _pt_bytes(c, protocol=4))
    for i, part in enumerate(np.array_split(ref, 5)):
        publish(f"in1k_clip_vit_l14_{i}", _pt_bytes({"image_features": torch.from_numpy(part)}))
    _run("filter", "image-based", "--pool", pool, "--out", tmp_path / "img.npy", "--scale", "small")
    got = uid_set(K.read_keep_list(tmp_path / "img.npy"))
    expect = _expected_image_based(pool, c, ref)
    assert got == expect and 0.05 * 3000 < len(expect) < 0.8 * 3000
    np.save(tmp_path / "c.npy", c)
    np.save(tmp_path / "ref.npy", ref)
    _run("filter", "image-based", "--pool", pool, "--out", tmp_path / "img_l2.npy", "--centroids", tmp_path / "c.npy",
         "--reference", tmp_path / "ref.npy", "--assign", "l2", "--batch-size", "100")
    expect_l2 = _expected_image_based(pool, c, ref, "l2")
    assert uid_set(K.read_keep_list(tmp_path / "img_l2.npy")) == expect_l2 and expect_l2 != expect

    # image-based AND CLIP score (DataComp's image_based_intersect_clip_score, l14, 30%)
    _run("filter", "clip-score", "--pool", pool, "--out", tmp_path / "clip.npy", "--arch", "l14", "--fraction", "0.3")
    _run("filter", "image-based", "--pool", pool, "--out", tmp_path / "both.npy", "--scale", "small",
         "--within", tmp_path / "clip.npy")
    df = read_pool_frame(pool)
    s = df.clip_l14_similarity_score.to_numpy()
    threshold = -np.sort(-s)[int(len(s) * 0.3)]  # DataComp's get_threshold
    expect_both = _expected_image_based(pool, c, ref, candidates=set(df.uid[s >= threshold]))
    assert uid_set(K.read_keep_list(tmp_path / "both.npy")) == expect_both
    assert 0 < len(expect_both) < len(expect)


def test_build_centroids_is_datacomps_kmeans(pool, tmp_path):
    import faiss

    _run("filter", "image-based-centroids", "--pool", pool, "--out", tmp_path / "c.npy", "--clusters", "6",
         "--gpu", "no")
    c = np.load(tmp_path / "c.npy")
    df = read_pool_frame(pool)
    x = np.ascontiguousarray(read_embeddings(pool)[_caption_ok(df.text)])
    cl = faiss.Clustering(x.shape[1], 6)  # as baselines/image_based_clustering.py
    cl.niter, cl.seed, cl.max_points_per_centroid = 20, 0, 10_000_000
    index = faiss.IndexFlatL2(x.shape[1])
    cl.train(x, index)
    ref = faiss.vector_float_to_array(cl.centroids).reshape(6, -1)
    assert c.shape == (6, 768) and np.allclose(c, ref, atol=1e-5)
    _run("filter", "image-based", "--pool", pool, "--out", tmp_path / "own.npy", "--centroids", tmp_path / "c.npy",
         "--reference", tmp_path / "c.npy")  # every centroid is a target: the caption filter alone remains
    assert uid_set(K.read_keep_list(tmp_path / "own.npy")) == set(df.uid[_caption_ok(df.text)])

    feats = x[::7].astype(np.float16)  # a reference set instead of a pool
    torch.save({"image_features": torch.from_numpy(feats)}, tmp_path / "feats.pt")
    _run("filter", "image-based-centroids", "--features", tmp_path / "feats.pt", "--out", tmp_path / "f.npy",
         "--clusters", "3", "--gpu", "no")
    cl = faiss.Clustering(x.shape[1], 3)
    cl.niter, cl.seed, cl.max_points_per_centroid = 20, 0, 10_000_000
    cl.train(np.ascontiguousarray(feats.astype(np.float32)), faiss.IndexFlatL2(x.shape[1]))
    assert np.allclose(np.load(tmp_path / "f.npy"), faiss.vector_float_to_array(cl.centroids).reshape(3, -1), atol=1e-5)
    _run("filter", "image-based-centroids", "--pool", pool, "--out", tmp_path / "s.npy", "--clusters", "4",
         "--train-sample", "500", "--gpu", "no")
    meta = json.loads((tmp_path / "s.json").read_text())
    assert np.load(tmp_path / "s.npy").shape == (4, 768) and meta["trained_on"] == 500 and meta["caption_filter"]


def test_image_based_on_our_clustering_engine(pool, tmp_path):
    emb = read_embeddings(pool)
    ref = emb[::250].astype(np.float16)  # a reference set: 12 pool images
    np.save(tmp_path / "ref.npy", ref)
    _run("filter", "image-based", "--pool", pool, "--out", tmp_path / "eng.npy", "--clusters", "8",
         "--reference", tmp_path / "ref.npy", "--executor", "inline", "--gpu", "no")
    c = np.load(tmp_path / "eng.clustering" / "centroids.npy")  # the engine's unit centroids
    expect = _expected_image_based(pool, c, ref)
    got = uid_set(K.read_keep_list(tmp_path / "eng.npy"))
    assert got == expect and 0 < len(expect) < len(set(read_pool_frame(pool).uid[_caption_ok(read_pool_frame(pool).text)]))
    _run("filter", "image-based", "--pool", pool, "--out", tmp_path / "again.npy", "--clustering",
         tmp_path / "eng.clustering", "--reference", tmp_path / "ref.npy", "--executor", "inline")
    assert uid_set(K.read_keep_list(tmp_path / "again.npy")) == expect
    assert main(["--quiet", "filter", "image-based", "--pool", str(pool), "--out", str(tmp_path / "x.npy")]) == 2


# -- laion2b with gcld3 --------------------------------------------------------------------------

def test_laion2b_uses_gcld3(pool, tmp_path):
    gcld3 = pytest.importorskip("gcld3", reason="gcld3 not installed (needs protobuf-compiler, libprotobuf-dev)")
    df = read_pool_frame(pool)
    lid = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    langs = [lid.FindLanguage(text=t.replace("\n", " ")).language for t in df.text]
    assert {"en", "de", "fr", "es", "it", "ja", "ru", "pt", "nl"} <= set(langs)
    score_ok = df.clip_b32_similarity_score.to_numpy() >= np.float32(0.28)
    expect = set(df.uid[(np.array(langs) == "en") & score_ok])
    _run("filter", "laion2b", "--pool", pool, "--out", tmp_path / "laion.npy")
    assert uid_set(K.read_keep_list(tmp_path / "laion.npy")) == expect and len(expect) > 50
    _run("filter", "laion2b", "--pool", pool, "--out", tmp_path / "laion_ft.npy", "--langid", "fasttext")
    expect_ft = set(df.uid[_fasttext_lang(df.text) & score_ok])
    assert uid_set(K.read_keep_list(tmp_path / "laion_ft.npy")) == expect_ft != expect
    assert K.read_manifest(tmp_path / "laion.npy")["params"]["langid"] == "gcld3"


def _numpy1_style(pt: bytes, proto: int) -> bytes:
    """The same checkpoint as numpy 1.x (DataComp's pin) pickles it: numpy.core, not numpy._core."""
    import io
    import struct
    import zipfile

    zin, out = zipfile.ZipFile(io.BytesIO(pt)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                if proto == 2:
                    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                else:  # protocol 4: a length-prefixed name inside a length-prefixed frame
                    n = struct.unpack("<Q", data[3:11])[0]
                    body = data[11:11 + n].replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray")
                    data = data[:3] + struct.pack("<Q", len(body)) + body + data[11 + n:]
                assert b"numpy.core.multiarray" in data
            zout.writestr(info, data)
    return out.getvalue()


@pytest.mark.parametrize("proto", [2, 4])
def test_load_pt_reads_numpy1_pickles(tmp_path, proto):
    c = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    (tmp_path / "c.pt").write_bytes(_numpy1_style(_pt_bytes(c, protocol=proto), proto))
    assert np.array_equal(A.load_centroids(tmp_path / "c.pt"), c)
