"""The theory of data pruning, reproduced qualitatively at a small size with fixed seeds
(Sorscher et al. 2022); fits; a pruning sweep sharing one clustering."""

import json

import numpy as np
import pytest

from conceptprune.apps.scaling import PerceptronConfig, fit, mean_errors, pareto, perceptron, read_points, write_perceptron
from conceptprune.slurm.stage import Executor

CFG = dict(dim=40, alpha_tot=(1, 2, 4, 8, 16, 32), fractions=(0.1, 0.2, 0.4, 0.7, 1.0), seeds=(0, 1))


@pytest.fixture(scope="module")
def perfect():
    return perceptron(PerceptronConfig(**CFG, theta=0.0))


@pytest.fixture(scope="module")
def noisy():
    return perceptron(PerceptronConfig(**CFG, theta=20.0))


def test_scarce_data_keep_easy_beats_keep_hard(perfect):
    m = mean_errors(perfect)
    for f in (0.1, 0.2, 0.4):
        assert m[(1.0, f, "easy")] < m[(1.0, f, "hard")] - 0.05


def test_abundant_data_keep_hard_beats_easy_and_random(perfect):
    m = mean_errors(perfect)
    for f in (0.2, 0.4):
        assert m[(32.0, f, "hard")] < m[(32.0, f, "random")] < m[(32.0, f, "easy")] + 0.02
        assert m[(32.0, f, "hard")] < 0.7 * m[(32.0, f, "random")]


def _exponent(points, min_size=2.0):
    pts = [(s, e) for s, e in points if s >= min_size]
    return fit(*zip(*pts))


def test_fixed_fraction_falls_as_a_power_law_with_the_random_exponent(perfect):
    m = mean_errors(perfect)
    rnd = _exponent([(a * f, e) for (a, f, s), e in m.items() if s == "random"])
    assert rnd["better"] == "power_law"
    for f in (0.4, 0.7):
        hard = _exponent([(a * f, m[(a, f, "hard")]) for a in CFG["alpha_tot"]])
        assert hard["better"] == "power_law"
        assert 0.5 < hard["power_law"]["exponent"] / rnd["power_law"]["exponent"] < 2.0


def test_pareto_envelope_falls_faster_than_the_best_power_law(perfect):
    m = mean_errors(perfect)
    front = [(ap, e) for ap, e, _ in pareto(perfect)]
    env = _exponent(front)["power_law"]["exponent"]
    fixed = [_exponent([(a * f, m[(a, f, s)]) for a in CFG["alpha_tot"]])["power_law"]["exponent"]
             for f in (0.4, 0.7, 1.0) for s in ("hard", "random")]
    assert env > 1.3 * max(fixed)


def test_noisy_probe_raises_the_smallest_useful_fraction(perfect, noisy):
    def best_f(rows):
        m = mean_errors(rows)
        return min(CFG["fractions"], key=lambda f: m[(32.0, f, "hard")])

    assert best_f(noisy) > best_f(perfect)
    m0, m1 = mean_errors(perfect), mean_errors(noisy)
    assert m1[(32.0, 0.2, "hard")] > 3 * m0[(32.0, 0.2, "hard")]  # aggressive pruning stops helping


def test_outputs_and_fit_command(perfect, tmp_path, capsys):
    from conceptprune.cli import main

    paths = write_perceptron(perfect, PerceptronConfig(**CFG), tmp_path)
    for name in ("perceptron.json", "perceptron.csv", "error_vs_alpha_prune.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 1000
    series = read_points(tmp_path / "perceptron.json")
    assert "pareto (keep hard, best f)" in series and "random, f=0.4" in series
    assert main(["scaling", "fit", str(tmp_path / "perceptron.json"), "--min-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "power law nu" in out and "pareto" in out


def test_fit_recovers_known_laws():
    n = np.array([1, 2, 4, 8, 16, 32.0])
    p = fit(n, 0.3 * n ** -0.8)
    assert p["better"] == "power_law" and p["power_law"]["exponent"] == pytest.approx(0.8)
    e = fit(n, 0.5 * np.exp(-0.2 * n))
    assert e["better"] == "exponential" and e["exponential"]["rate"] == pytest.approx(0.2)
    runs = [{"series": "dbp", "kept": k, "accuracy": 1 - 0.5 * k ** -0.5} for k in (100, 200, 400, 800)]
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "runs.json"
    path.write_text(json.dumps(runs))
    sizes, errs = read_points(path)["dbp"]
    assert fit(sizes, errs)["power_law"]["exponent"] == pytest.approx(0.5)


def test_sweep_shares_one_clustering(tmp_path):
    from conceptprune.keeplist import read_keep_list
    from conceptprune.apps.scaling import sweep
    from conceptprune.synthetic import SyntheticPoolConfig, make_pool

    make_pool(tmp_path / "pool", SyntheticPoolConfig(rows=3000, files=1, seed=3, concepts=5,
                                                     embedding_keys=("l14_img",)), progress=False)
    res = sweep(str(tmp_path / "pool"), "dbp", [0.2, 0.5], str(tmp_path / "sweep"),
                filter_args={"clusters": 5, "niter": 10, "executor": Executor.create("inline")},
                command=["conceptprune", "scaling", "sweep", "--method", "dbp"])
    assert [r["kept"] for r in res["rows"]] == [600, 1500]
    manifest = json.loads((tmp_path / "sweep" / "keep_0.2.json").read_text())
    assert manifest["command"] == ["conceptprune", "scaling", "sweep", "--method", "dbp"]
    assert len(read_keep_list(tmp_path / "sweep" / "keep_0.2.npy")) == 600
    assert len(list((tmp_path / "sweep").glob("*.clustering"))) == 0  # one shared folder, not one per fraction
    assert (tmp_path / "sweep" / "clustering" / "clustering.json").exists()
