"""embed's decoding (issue 17.5): worker processes and the thread fallback give the same rows
and the same embeddings, in shard order, a broken image left out and counted."""

import io
import json

import numpy as np
import pyarrow.parquet as pq

from conceptprune.data.embed import EmbedStage
from conceptprune.tars import Sample, ShardWriter


def test_process_and_thread_decoding_agree(tmp_path):
    import open_clip
    import torch
    from PIL import Image

    from conceptprune.models import register

    register()
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    torch.save({"state_dict": open_clip.create_model("cp-tiny-vit").state_dict()}, ckpt)
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for s in range(2):
        w = ShardWriter(shards / f"{s:08d}.tar")
        for i in range(23):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
            jpg = buf.getvalue() if (s, i) != (1, 5) else b"not a jpeg"
            w.write(Sample(f"{s:04d}{i:04d}", {"jpg": jpg, "txt": b"t", "json": json.dumps({"uid": f"{s:016x}{i:016x}"}).encode()}))
        w.close()
    results = {}
    for threads in (1, 2):  # 1: a thread; 2: two forked processes
        out = tmp_path / f"emb{threads}"
        summary = EmbedStage(str(out), str(shards), "cp-tiny-vit", str(ckpt), batch_size=8, device="cpu",
                             threads=threads).run(0, 1)
        assert summary["embedded"] == 45 and summary["undecodable"] == 1
        results[threads] = ([pq.read_table(p)["uid"].to_pylist() for p in sorted(out.glob("*.parquet"))],
                            [np.load(p)["img"] for p in sorted(out.glob("*.npz"))])
    assert results[1][0] == results[2][0]
    assert results[1][0][1] == [f"{1:016x}{i:016x}" for i in range(23) if i != 5]
    for a, b in zip(results[1][1], results[2][1]):
        assert np.array_equal(a, b)


def test_decode_workers_end_when_a_job_bypasses_sigterm(tmp_path):
    """Inside a submitit job SIGTERM is caught and ignored; forked decode workers inherit that
    handler, so closing the pool (SIGTERM) while they are busy hung the job for ever."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGTERM, lambda *a: None)  # what submitit does in a SLURM job
        import conceptprune.data.embed as E
        def slow(data, preprocess):
            time.sleep(30)
        E._decode_bytes = slow
        d = E._Decoders(lambda im: im, 2)
        d.pool.map_async(E._decode_in_worker, [b"x"] * 4, chunksize=1)
        time.sleep(1)  # the workers are busy
        d.close()
        print("closed")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=25)
    assert out.returncode == 0 and "closed" in out.stdout, out.stderr[-2000:]
