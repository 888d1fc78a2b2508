"""A torch backend for the two GPU paths that matter when faiss-gpu is absent (a bare CUDA
machine has torch but no faiss): exact inner-product top-k search (the clustering's assignment)
and SemDeDup's pairwise pass.

``TorchIPIndex(centroids, device).search(x, k)`` answers like faiss's ``IndexFlatIP.search``:
float32 scores, best first, ties to the lowest id (a stable sort of each row's scores), so it
can stand in for the faiss index in ``clustering.nearest_centroids``, whose exact float64
recheck of near-tied rows then makes the assignment equal to the faiss path's whatever the
last bits of either GEMM. Queries and base are float32; memory O(block * len(base)).

``centroid_index(centroids, gpu)`` is the index the assignment searches: faiss-gpu where faiss
sees a GPU, this torch index on CUDA where torch does and faiss does not (or is absent), else
faiss on the CPU.

``column_max_upper(e, device)`` is ``pairwise.column_max_upper`` (M_j = max_{i<j} <e_i, e_j>)
with the float32 GEMM blocks on ``device``; the GEMM's summation order differs from the CPU's
BLAS, so M_j agree to float32 rounding (~1e-7), not bit for bit.
"""

from __future__ import annotations

import numpy as np

BLOCK = 8192  # query rows per GEMM block
CUDA_SCORES = 1 << 28  # scores a block on CUDA (1 GiB of float32)


def _torch():
    import torch

    return torch


def torch_sees_cuda() -> bool:
    """torch sees a GPU. Without an NVIDIA device node there is none, and torch (~480 MiB of
    RSS a process) is not imported to learn that (CONCEPTPRUNE_PROBE_CUDA=1 asks torch anyway)."""
    import glob
    import os

    if not glob.glob("/dev/nvidia[0-9]*") and not os.environ.get("CONCEPTPRUNE_PROBE_CUDA"):
        return False
    return _torch().cuda.is_available()


def centroid_index(centroids: np.ndarray, gpu: str = "auto"):
    """An exact inner-product index over ``centroids`` with faiss's ``search(x, k)``: faiss-gpu
    when faiss sees a GPU, else the torch CUDA index when torch sees one, else faiss on the CPU.
    ``gpu``: auto, yes (a GPU or an error) or no."""
    from conceptprune.errors import ConfigError

    try:
        import faiss
    except ImportError:
        faiss = None
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    faiss_gpus = faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0
    if gpu != "no" and faiss_gpus > 0:
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(c.shape[1]))
    elif gpu != "no" and torch_sees_cuda():
        return TorchIPIndex(c, "cuda", block=max(1024, min(65536, CUDA_SCORES // max(1, len(c)))))
    elif gpu == "yes":
        raise ConfigError("--gpu yes: neither faiss nor torch sees a GPU")
    elif faiss is None:
        raise ConfigError("faiss is not installed: pip install 'conceptprune[cpu]' (or '[gpu]')")
    else:
        index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    return index


class TorchIPIndex:
    """Exact inner-product search over ``base`` (n x d) on a torch device."""

    def __init__(self, base: np.ndarray, device: str = "cpu", block: int = BLOCK):
        torch = _torch()
        self.device = torch.device(device)
        self.base = torch.as_tensor(np.ascontiguousarray(base, dtype=np.float32), device=self.device)
        self.ntotal, self.d = self.base.shape
        self.block = block

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 n x k, ids int64 n x k), best first, ties to the lowest id."""
        torch = _torch()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"queries of shape {x.shape}; the index holds {self.d}-d vectors")
        k = min(k, self.ntotal)
        scores = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        with torch.no_grad():
            for a in range(0, len(x), self.block):
                q = torch.as_tensor(x[a:a + self.block], device=self.device)
                s = q @ self.base.T
                if k <= 8:  # the top k through topk, then every score tied with the k-th resolved by id
                    v, i = self._top_small(s, k)
                else:
                    v, i = torch.sort(s, dim=1, descending=True, stable=True)
                    v, i = v[:, :k], i[:, :k]
                scores[a:a + len(q)] = v.cpu().numpy()
                ids[a:a + len(q)] = i.cpu().numpy()
        return scores, ids

    @staticmethod
    def _top_small(s, k: int):
        """topk's order among equal scores is unspecified: rank (score desc, id asc) exactly by
        a stable sort of the candidates at or above the k-th best score (usually k of them)."""
        torch = _torch()
        kth = torch.topk(s, k, dim=1).values[:, -1:]
        ge = s >= kth
        width = int(ge.sum(dim=1).max())
        if width == k:  # no tie crosses the k-th place: every row has exactly k candidates
            idx = torch.nonzero(ge)[:, 1].reshape(len(s), k)  # ascending ids per row
            vals = torch.gather(s, 1, idx)
        else:
            ranks = torch.where(ge, torch.arange(s.shape[1], device=s.device), s.shape[1])
            ranks = torch.sort(ranks, dim=1).values[:, :width]  # candidate ids ascending, then fillers
            valid = ranks < s.shape[1]
            idx = torch.where(valid, ranks, 0)
            vals = torch.where(valid, torch.gather(s, 1, idx), torch.tensor(-float("inf"), device=s.device))
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]  # stable: ids ascend
        return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def column_max_upper(e: np.ndarray, device: str = "cpu", block: int = 4096) -> np.ndarray:
    """M_j = max_{i<j} <e_i, e_j> (M_0 = -inf), float32, in GEMM blocks on ``device``."""
    torch = _torch()
    with torch.no_grad():
        t = torch.as_tensor(np.ascontiguousarray(e, dtype=np.float32), device=torch.device(device))
        n = len(t)
        out = torch.empty(n, dtype=torch.float32, device=t.device)
        for c0 in range(0, n, block):
            c1 = min(n, c0 + block)
            cols = t[c0:c1]
            s = cols @ cols.T
            s.masked_fill_(torch.ones_like(s, dtype=torch.bool).tril(), -float("inf"))  # keep i < j only
            best = s.max(dim=0).values
            for r0 in range(0, c0, block):
                r1 = min(c0, r0 + block)
                best = torch.maximum(best, (t[r0:r1] @ cols.T).max(dim=0).values)
            out[c0:c1] = best
        return out.cpu().numpy()
