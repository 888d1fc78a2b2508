"""The filter registry (issue 26.4): a filter is declared once, in its own module, and the CLI,
``explain`` and the scaling sweep find it there. The example filter below lives in a module of
its own outside the package: adding it touched that module and this test, nothing else."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conceptprune import keeplist as K
from conceptprune import uids as U
from conceptprune.errors import ConfigError
from conceptprune.filters import registry

from conftest import read_pool_frame, uid_set

EXAMPLE = textwrap.dedent('''
    """A tiny filter: keep the fraction F of candidates with the smallest uids."""
    import numpy as np

    from conceptprune.checks import fraction_arg
    from conceptprune.filters.base import FilterResult, as_within, target_count
    from conceptprune.filters.registry import FilterSpec, Param, register


    def smallest_uids(pool, *, within=None, fraction=0.5):
        within = as_within(within)
        kept = []
        n = 0
        for chunk in pool.iter_chunks():
            u = chunk.uids[within.mask(chunk.uids)]
            kept.append(u)
            n += len(u)
        within.check()
        allu = np.sort(np.concatenate(kept), order=["f0", "f1"])
        k = target_count(fraction, n)
        return FilterResult("smallest-uids", allu[:k], {"fraction": fraction}, {"pool": pool.rows, "candidates": n})


    def explain(view, q, kept):
        return {"why": f"uid {'<=' if kept else '>'} the cut of fraction {view.params['fraction']}"}


    register(FilterSpec("smallest-uids", "keep the fraction F of candidates with the smallest uids", smallest_uids,
                        runs_as="list", sweep=True, explain=explain, jobs=False,
                        params=(Param("--fraction", fraction_arg(), required=True, help="fraction kept"),)))
''')


@pytest.fixture
def example_env(tmp_path):
    mod = tmp_path / "plugins"
    mod.mkdir()
    (mod / "cp_example_filter.py").write_text(EXAMPLE)
    env = dict(os.environ, PYTHONPATH=f"{mod}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               CONCEPTPRUNE_FILTER_MODULES="cp_example_filter", HF_HUB_OFFLINE="1")
    return env


def _cp(args, env):
    r = subprocess.run([sys.executable, "-m", "conceptprune.cli", "--quiet", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_an_example_filter_in_its_own_module_reaches_cli_explain_and_sweep(small_pool, tmp_path, example_env):
    df = read_pool_frame(small_pool)
    keep = tmp_path / "small.npy"
    out = _cp(["filter", "--help"], example_env)
    assert "smallest-uids" in out
    _cp(["filter", "smallest-uids", "--pool", str(small_pool), "--out", str(keep), "--fraction", "0.25"], example_env)
    # the list is what the filter says, computed independently here
    pairs = sorted(U.uid_to_pair(u) for u in df.uid)
    want = {U.pair_to_uid(*p) for p in pairs[:round(0.25 * len(pairs))]}
    assert uid_set(K.read_keep_list(keep)) == want
    assert K.read_manifest(keep)["method"] == "smallest-uids"
    # explain calls the filter's own hook
    first = sorted(want)[0]
    res = json.loads(_cp(["explain", first, "--chain", str(keep), "--json"], example_env))
    assert res["steps"][0]["status"] == "kept"
    assert res["steps"][0]["why"] == "uid <= the cut of fraction 0.25"
    # the scaling sweep offers it (its spec says sweep=True) and runs it at two fractions
    rows = json.loads(_cp(["scaling", "sweep", "--pool", str(small_pool), "--method", "smallest-uids",
                           "--fractions", "0.1,0.2", "--out", str(tmp_path / "sweep")], example_env))
    assert [r["kept"] for r in rows] == [round(0.1 * len(df)), round(0.2 * len(df))]


def test_without_the_module_the_filter_does_not_exist(small_pool, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("CONCEPTPRUNE_FILTER_MODULES", None)
    r = subprocess.run([sys.executable, "-m", "conceptprune.cli", "filter", "smallest-uids", "--pool", str(small_pool),
                        "--out", str(tmp_path / "k.npy"), "--fraction", "0.5"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'smallest-uids'" in r.stderr


def test_every_filter_is_declared_once_with_how_it_runs():
    specs = registry.specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    # each of the package's filters declares itself, with the way its work is cut
    expected = {"none": "rows", "random": "rows", "clip-score": "rows", "basic": "rows", "laion2b": "rows",
                "dbp": "clustering", "semdedup": "clustering", "ssl-prototypes": "clustering",
                "image-based": "clustering", "text-based": "list"}
    got = {s.name: s.runs_as for s in specs if s.fn is not None}
    assert {k: got.get(k) for k in expected} == expected
    # no filter function carries the old attribute protocol
    for s in specs:
        if s.fn is not None:
            assert not hasattr(s.fn, "uses_rows") and not hasattr(s.fn, "uses_clustering"), s.name
    assert registry.runs_as(registry.get("dbp").fn) == "clustering"
    assert registry.runs_as(lambda pool, within=None: None) == "list"  # an unregistered function


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown filter 'nope'"):
        registry.get("nope")
    spec = registry.get("dbp")
    assert spec.params_from({"fraction": 0.5, "prefer": "easy", "temperature": 0.2}) == \
        {"fraction": 0.5, "keep": "easy", "temperature": 0.2}
    with pytest.raises(ConfigError, match="filter dbp has no parameter 'eps'"):
        spec.params_from({"eps": 0.1})


def test_a_spec_says_how_it_runs():
    with pytest.raises(ValueError, match="runs_as"):
        registry.FilterSpec("x", "x", fn=len, runs_as="sometimes")
    with pytest.raises(ValueError, match="exactly one of fn"):
        registry.FilterSpec("x", "x")
