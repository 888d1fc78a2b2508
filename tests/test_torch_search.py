"""filters/torch_search.py (issue 17.6): the torch backend answers as faiss's IndexFlatIP does
(ties to the lowest id), gives the clustering's exact assignment, and SemDeDup's M_j."""

import numpy as np
import pytest

from conceptprune.filters.torch_search import TorchIPIndex, column_max_upper

faiss = pytest.importorskip("faiss")


def _data(seed=0, n=3000, k=64, d=16):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, c


@pytest.mark.parametrize("k", [1, 2, 5, 16, 64])
def test_search_equals_faiss_where_no_scores_are_near(k):
    x, c = _data()
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    fs, fi = index.search(x, k)
    ts, ti = TorchIPIndex(c, block=700).search(x, k)
    assert np.allclose(fs, ts, atol=1e-5)
    gap = np.diff(np.sort(x @ c.T, axis=1)[:, ::-1][:, :k + 1], axis=1).min(axis=1) if k < len(c) else None
    clear = np.abs(gap) > 1e-4 if gap is not None else np.ones(len(x), bool)
    assert clear.mean() > 0.9
    assert (fi[clear] == ti[clear]).all()


def test_exact_ties_go_to_the_lowest_id():
    c = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5], [1, 0]], dtype=np.float32)  # 0, 2, 4 identical
    x = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)  # the last row ties with every centroid
    for k in (1, 2, 3, 5):
        s, i = TorchIPIndex(c).search(x, k)
        assert i[0].tolist() == [0, 2, 4, 3, 1][:k]
        assert i[1].tolist() == [1, 3, 0, 2, 4][:k]
        assert i[2].tolist() == [0, 1, 2, 3, 4][:k]
        assert (np.diff(s, axis=1) <= 0).all()


def test_nearest_centroids_through_torch_equals_faiss():
    """Plugged into the clustering's assignment (near-ties rechecked in float64), the torch
    index gives the faiss path's clusters, planted exact and near ties included."""
    from conceptprune.filters.clustering import nearest_centroids

    x, c = _data(1, n=4000, k=100, d=24)
    c[50] = c[7]  # an exact duplicate centroid: rows nearest it go to 7
    x[:200] = c[7] + 1e-7 * np.random.default_rng(2).standard_normal((200, 24)).astype(np.float32)
    x[200:300] = (c[3] + c[4]) / 2  # equidistant from 3 and 4
    norms = np.linalg.norm(x, axis=1)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    c64 = c.astype(np.float64)
    want = nearest_centroids(index, c64, x, norms, None)
    got = nearest_centroids(TorchIPIndex(c, block=512), c64, x, norms, None)
    assert (want == got).all()
    assert (got[:200] != 50).all()


def test_column_max_upper_matches_the_cpu_pass():
    from conceptprune.filters.semdedup import column_max_upper as cpu

    rng = np.random.default_rng(3)
    e = rng.standard_normal((1500, 32)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[700] = e[100]  # a planted exact duplicate: M_700 = 1
    want = cpu(e, block=256)
    got = column_max_upper(e, "cpu", block=300)
    assert got[0] == -np.inf and want[0] == -np.inf
    assert np.abs(got[1:] - want[1:]).max() < 1e-6
    assert abs(got[700] - 1) < 1e-6


def test_centroid_index_is_faiss_on_a_cpu_machine():
    """Without a GPU the assignment's index is faiss's own (and --gpu yes is refused); the same
    function gives the torch CUDA index where CUDA is and faiss-gpu is not (next test)."""
    import torch

    from conceptprune.errors import ConfigError
    from conceptprune.filters.torch_search import centroid_index

    if torch.cuda.is_available() or (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
        pytest.skip("a GPU is present")
    x, c = _data(4)
    for gpu in ("auto", "no"):
        index = centroid_index(c, gpu)
        assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == len(c)
        want = faiss.IndexFlatIP(c.shape[1])
        want.add(c)
        assert (index.search(x, 2)[1] == want.search(x, 2)[1]).all()
    with pytest.raises(ConfigError, match="--gpu yes"):
        centroid_index(c, "yes")


def test_centroid_index_on_cuda_assigns_as_faiss_cpu():
    import torch

    from conceptprune.filters.clustering import nearest_centroids
    from conceptprune.filters.torch_search import centroid_index

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, c = _data(5, n=20000, k=300, d=64)
    index = centroid_index(c, "yes")
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        assert not isinstance(index, TorchIPIndex)  # faiss-gpu first
    else:
        assert isinstance(index, TorchIPIndex) and index.device.type == "cuda"
    cpu = faiss.IndexFlatIP(c.shape[1])
    cpu.add(c)
    norms, c64 = np.linalg.norm(x, axis=1), c.astype(np.float64)
    assert (nearest_centroids(index, c64, x, norms, None) == nearest_centroids(cpu, c64, x, norms, None)).all()
