"""filters/pairwise.py (issue 17.2): SemDeDup's M_j from a fast GEMM (bfloat16 or float32) plus an
exact recheck equals an independent float64 computation, rounded to float32, on clusters with
pairs planted within 1e-4 of the threshold on both sides; for an eps (exact from its threshold)
and for a target size (exact everywhere), with the fast path and the fp32 path."""

from __future__ import annotations

import numpy as np
import pytest

from conceptprune.filters.pairwise import PairwiseConfig, _exact_max, _Gemm, exact_column_max, normalized

THRESHOLD = np.float32(1 - 0.05)
PATHS = [PairwiseConfig("fp32", "cpu"), PairwiseConfig("bf16-recheck", "cpu")]


def _planted_cluster(seed: int, n: int = 1200, pairs: int = 150, dim: int = 96) -> np.ndarray:
    """One cluster's rows in order: spread around a centre, ``pairs`` of them with a later twin
    whose cosine is THRESHOLD +- 1e-4 (both sides), a few exact duplicates; fp16 as stored,
    normalised as the pool normalises them."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim)
    x = centre + 1.2 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base = rng.choice(n // 2, pairs, replace=False)
    twin = n // 2 + rng.choice(n - n // 2, pairs, replace=False)
    w = rng.standard_normal((pairs, dim))
    w -= (w * x[base]).sum(1, keepdims=True) * x[base]
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    target = float(THRESHOLD) + rng.uniform(-1e-4, 1e-4, pairs)
    x[twin] = target[:, None] * x[base] + np.sqrt(1 - target ** 2)[:, None] * w
    x[n - 3:] = x[:3]  # exact duplicates: M = 1 for the last rows
    return normalized(x.astype(np.float16))


def _reference(e: np.ndarray) -> np.ndarray:
    """Independent: the full S in float64 (exact products, float64 sums), M_j = max_{i<j},
    rounded to float32."""
    s = e.astype(np.float64) @ e.astype(np.float64).T
    s[np.tril_indices(len(e))] = -np.inf
    return s.max(axis=0).astype(np.float32)


@pytest.fixture(scope="module")
def clusters():
    out = [_planted_cluster(s) for s in range(3)]
    for e in out:  # the planted similarities do sit within 1e-4 of the threshold, on both sides
        m = _reference(e).astype(np.float64)
        near = np.abs(m - THRESHOLD) < 1e-4
        assert (near & (m > THRESHOLD)).sum() >= 20 and (near & (m <= THRESHOLD)).sum() >= 20
    return out


@pytest.mark.parametrize("cfg", PATHS, ids=lambda c: c.precision)
def test_target_size_needs_m_exact_everywhere(clusters, cfg):
    for e in clusters:
        want = _reference(e)
        got = exact_column_max(e, cfg)
        assert got[0] == -np.inf
        np.testing.assert_array_equal(got, want)  # the same bits, so any ranking of M is float32's
        n_keep = int(0.7 * len(e))
        cut = np.sort(want)[n_keep - 1]
        assert (np.sort(got)[:n_keep] == np.sort(want)[:n_keep]).all() and (got <= cut).sum() == n_keep


@pytest.mark.parametrize("cfg", PATHS, ids=lambda c: c.precision)
def test_eps_decisions_and_m_above_the_threshold_are_exact(clusters, cfg):
    for e in clusters:
        want = _reference(e)
        got = exact_column_max(e, cfg, exact_from=float(THRESHOLD))
        np.testing.assert_array_equal(got > THRESHOLD, want > THRESHOLD)
        high = want >= THRESHOLD  # exact wherever it reaches the threshold (below: the fast GEMM's value)
        assert (got[~high] < THRESHOLD).all()
        np.testing.assert_array_equal(got[high], want[high])
        if cfg.precision == "bf16-recheck":  # the test can tell: bfloat16 alone decides otherwise
            x16 = e.astype(np.float32)
            import torch

            b = torch.from_numpy(x16).bfloat16()
            s = (b @ b.T).float().numpy()
            s[np.tril_indices(len(e))] = -np.inf
            assert ((s.max(axis=0) > THRESHOLD) != (want > THRESHOLD)).any()


def test_blocks_and_cluster_sizes_do_not_change_m():
    e = _planted_cluster(7, n=700, pairs=60)
    want = _reference(e)
    for cfg in (PairwiseConfig("bf16-recheck", "cpu", block=64), PairwiseConfig("fp32", "cpu", block=1000)):
        np.testing.assert_array_equal(exact_column_max(e, cfg), want)
        for n in (0, 1, 2, 5):
            np.testing.assert_array_equal(exact_column_max(e[:n], cfg), want[:n] if n else np.empty(0, np.float32))


def test_a_float64_midpoint_is_rounded_exactly():
    """<a, b> = 1 + 2^-24 + 2^-60: float64 rounds it onto the midpoint between the float32s 1 and
    1 + 2^-23 (then 1 by ties-to-even); the exact value is above it, so M is 1 + 2^-23."""
    a = np.array([1.0, 2.0 ** -12, 2.0 ** -30, 0.0], dtype=np.float32)
    e = np.stack([a, a])
    assert np.float32(np.dot(a.astype(np.float64), a.astype(np.float64))) == 1.0  # the naive rounding
    for precision in ("fp32", "bf16-recheck"):
        m = exact_column_max(e, PairwiseConfig(precision, "cpu"))
        assert m[1] == np.float32(1 + 2.0 ** -23)


def test_a_gemm_outside_its_bound_is_refused():
    e = _planted_cluster(1, n=50, pairs=5)
    g = _Gemm(e, PairwiseConfig("bf16-recheck", "cpu").resolved())
    ri, cj = np.array([0]), np.array([1])
    exact = float(e[0].astype(np.float64) @ e[1].astype(np.float64))
    wrong = np.array([exact + 2 * (g.bound16.c0 + g.bound16.c1)], dtype=np.float32)
    with pytest.raises(RuntimeError, match="exceeds its proven bound"):
        _exact_max(e, ri, cj, np.array([0]), 1, wrong, g.bound16)
    ok = np.array([exact], dtype=np.float32)
    assert _exact_max(e, ri, cj, np.array([0]), 1, ok, g.bound16)[0] == np.float32(exact)


def test_auto_takes_the_fast_path_only_where_it_pays():
    from conceptprune.filters.pairwise import cpu_has_fast_bf16

    cpu = PairwiseConfig(device="cpu")
    assert cpu.resolved(exact_everywhere=True).precision == "fp32"
    assert cpu.resolved().precision == ("bf16-recheck" if cpu_has_fast_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision"):
        PairwiseConfig("fp16").resolved()


def test_cuda_gives_the_same_bits():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    e = _planted_cluster(3)
    want = _reference(e)
    for precision in ("fp32", "bf16-recheck"):
        cfg = PairwiseConfig(precision, "cuda")
        np.testing.assert_array_equal(exact_column_max(e, cfg), want)
        got = exact_column_max(e, cfg, exact_from=float(THRESHOLD))
        np.testing.assert_array_equal(got > THRESHOLD, want > THRESHOLD)


def test_a_cpu_without_amx_computes_m_without_importing_torch():
    """float32 on the CPU is numpy alone: a SemDeDup process (here the whole filter inline)
    does not pay torch's ~480 MiB."""
    import glob
    import subprocess
    import sys

    if glob.glob("/dev/nvidia[0-9]*"):
        pytest.skip("an NVIDIA device is present: auto asks torch about CUDA")
    # the whole filter in one process (k-means, assignment, shuffle, dedup), then the kernel
    code = ("import sys, tempfile, numpy as np\n"
            "from conceptprune.filters import run_filter, semdedup\n"
            "from conceptprune.filters.clustering_config import ClusteringConfig\n"
            "from conceptprune.filters.pairwise import PairwiseConfig, cpu_has_fast_bf16, exact_column_max\n"
            "from conceptprune.slurm.stage import Executor\n"
            "from conceptprune.synthetic import SyntheticPoolConfig, make_pool\n"
            "d = tempfile.mkdtemp()\n"
            "make_pool(d + '/pool', SyntheticPoolConfig(rows=2000, files=1, seed=1, concepts=4, "
            "embedding_keys=('l14_img',)), progress=False)\n"
            "run_filter(semdedup, d + '/pool', d + '/k.npy', embedding_key='l14_img', eps=0.05, executor=Executor.create('inline'), "
            "clustering=ClusteringConfig(clusters=4, niter=5))\n"
            "x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)\n"
            "cfg = PairwiseConfig().resolved(exact_everywhere=False)\n"
            "m = exact_column_max(x, PairwiseConfig(), 0.5)\n"
            "print(cfg.precision, 'torch' in sys.modules, cpu_has_fast_bf16())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[2] == "True":
        pytest.skip("this CPU has AMX: auto takes bf16-recheck through torch")
    assert out[:2] == ["fp32", "False"], out
