import json
import subprocess
import sys

import numpy as np
import pytest

from conceptprune import keeplist as K
from conceptprune.cli import build_parser, main

from conftest import read_pool_frame, uid_set


def _all_subparsers(parser, prefix=()):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _all_subparsers(sub, prefix + (name,))


def test_every_command_has_complete_help():
    parser = build_parser()
    seen = []
    for path, sub in _all_subparsers(parser):
        text = sub.format_help()
        seen.append(" ".join(path))
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"'{' '.join(path)} {action.option_strings[0]}' has no help text"
    for needed in ("filter random", "filter clip-score", "filter basic", "filter none", "make-pool",
                   "keep-list info", "keep-list intersect", "keep-list union", "keep-list diff"):
        assert needed in seen


def test_console_script_help_and_error_exit():
    out = subprocess.run([sys.executable, "-m", "conceptprune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "filter" in out.stdout
    out = subprocess.run([sys.executable, "-m", "conceptprune.cli", "filter", "random", "--pool", "/nonexistent",
                          "--out", "/tmp/x.npy", "--fraction", "0.5"], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pool directory not found" in lines[0]


def test_filter_cli_and_keep_list_tools(small_pool, tmp_path, capsys):
    assert main(["--quiet", "filter", "clip-score", "--pool", str(small_pool), "--out", str(tmp_path / "a.npy"),
                 "--fraction", "0.4"]) == 0
    assert main(["--quiet", "filter", "random", "--pool", str(small_pool), "--out", str(tmp_path / "b.npy"),
                 "--fraction", "0.4", "--seed", "2"]) == 0
    a, b = K.read_keep_list(tmp_path / "a.npy"), K.read_keep_list(tmp_path / "b.npy")
    for op, expected in (("intersect", uid_set(a) & uid_set(b)), ("union", uid_set(a) | uid_set(b)),
                         ("diff", uid_set(a) - uid_set(b))):
        assert main(["keep-list", op, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                     "--out", str(tmp_path / f"{op}.npy")]) == 0
        assert uid_set(K.read_keep_list(tmp_path / f"{op}.npy")) == expected
    capsys.readouterr()
    assert main(["keep-list", "info", str(tmp_path / "a.npy")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["distinct"] == info["entries"] == len(a) and info["manifest"]["method"] == "clip-score"
    assert info["manifest"]["command"][:4] == ["conceptprune", "--quiet", "filter", "clip-score"]


def test_cli_errors_are_one_line(small_pool, tmp_path, capsys):
    rc = main(["filter", "random", "--pool", str(small_pool), "--out", str(tmp_path / "x.npy"), "--fraction", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("conceptprune filter: error: --fraction must be in (0, 1]")
    np.save(tmp_path / "bad.npy", np.arange(3))
    rc = main(["filter", "none", "--pool", str(small_pool), "--out", str(tmp_path / "y.npy"),
               "--within", str(tmp_path / "bad.npy")])
    assert rc == 2 and "dtype" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()


def test_keep_list_sort_repairs(tmp_path, capsys):
    from conceptprune import uids as U
    arr = U.uids_to_array([f"{i:032x}" for i in (5, 3, 3, 9)])
    np.save(tmp_path / "messy.npy", arr)
    assert main(["keep-list", "sort", str(tmp_path / "messy.npy"), "--out", str(tmp_path / "clean.npy")]) == 0
    assert U.array_to_uids(K.read_keep_list(tmp_path / "clean.npy")) == [f"{i:032x}" for i in (3, 5, 9)]


def test_make_pool_and_pool_commands(tmp_path, capsys):
    assert main(["--quiet", "make-pool", "--out", str(tmp_path / "p"), "--rows", "500", "--files", "2",
                 "--embedding-keys", "b32_img"]) == 0
    assert len(read_pool_frame(tmp_path / "p")) == 500
    capsys.readouterr()
    assert main(["pool", "info", str(tmp_path / "p")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 500 and info["embedding_keys"] == ["b32_img"]
    assert main(["--quiet", "pool", "validate", str(tmp_path / "p"), "--embedding-key", "b32_img"]) == 0
    assert "ok: 2 files, 500 rows" in capsys.readouterr().out


@pytest.mark.parametrize("argv, said", [
    (["filter", "clip-score", "--model", "b32", "--fraction", "0.3"], "--model is now --arch"),
    (["filter", "dbp", "--keep", "easy", "--fraction", "0.5"], "--keep is now --prefer"),
    (["filter", "ssl-prototypes", "--keep", "easy", "--fraction", "0.5"], "--keep is now --prefer"),
    (["evaluate", "--model", "x.pt", "--data-dir", "d", "--output", "r"], "--output is now --out"),
])
def test_a_flag_name_means_one_thing(small_pool, tmp_path, capsys, argv, said):
    """--model names a trained model, --keep a keep-list, --out the output: the old spellings
    that meant something else are one-line errors naming the new flag, and write nothing."""
    if argv[0] == "filter":
        argv = [*argv, "--pool", str(small_pool), "--out", str(tmp_path / "k.npy")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_semdedup_pairwise_flag_is_checked(small_pool, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["filter", "semdedup", "--pool", str(small_pool), "--out", str(tmp_path / "s.npy"), "--eps", "0.1",
              "--pairwise", "fp16"])
    assert e.value.code == 2 and "--pairwise: invalid choice: 'fp16'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
