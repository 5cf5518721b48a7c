"""Each search algorithm and trial scheduler `tokenforge tune` offers, in a real tiny experiment.

These need the `search` extra (`pip install -e '.[search]'`); each test skips, naming the missing
package, without it. They carry the `search` mark and are left out of the README's test command
(pyproject's addopts); `.ci/run` installs the extra and runs them with `pytest -m search`.
"""

import importlib.util
import json
from pathlib import Path

import pytest
from test_tune import metrics, trial_dirs, write_spec

from pipeline.tune.experiment import RESTORES_FILE
from pipeline.tune.experiment import run as run_experiment

pytestmark = pytest.mark.search


def needs(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs {package} (pip install -e '.[search]')")


def finished(experiment) -> list[list[str]]:
    rows = [row.split(",") for row in (experiment / "trials.csv").read_text().splitlines()[1:]]
    assert rows and all(row[-1] == "TERMINATED" for row in rows), rows
    return rows


@pytest.mark.parametrize(
    ("search_alg", "module", "package"),
    [
        ("optuna", "optuna", "optuna"),
        ("hyperopt", "hyperopt", "hyperopt"),
        ("bayesopt", "bayes_opt", "bayesian-optimization<2"),
    ],
)
def test_each_search_algorithm_proposes_trials_in_the_space(ray_cluster, tmp_path, search_alg, module, package):
    needs(module, package)
    spec = write_spec(
        tmp_path,
        {"reward.weights.digit_match": {"strategy": "uniform", "values": [0.1, 0.9]}},
        {"name": search_alg, "search_alg": search_alg, "num_samples": 2, "max_concurrent_trials": 2},
        base={"trainer.total_steps": 4},
    )
    rows = finished(Path(run_experiment(str(spec))))
    weights = [float(row[1]) for row in rows]
    assert len(rows) == 2 and all(0.1 <= w <= 0.9 for w in weights) and weights[0] != weights[1]


def test_asha_stops_the_worse_trial_early(ray_cluster, tmp_path):
    """One trial at a time (so the order is fixed): lr 5e-4 runs to the end; then lr 0.5, which wrecks the
    model within two steps, reaches ASHA's first rung (2 reports) below it and is stopped there."""
    spec = write_spec(
        tmp_path,
        {"learner.lr": {"strategy": "grid", "values": [5e-4, 0.5]}},
        {
            "name": "asha",
            "max_concurrent_trials": 1,
            "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
        },
        base={"trainer.total_steps": 12, "trainer.eval_every": 2, "learner.warmup_steps": 0},
    )
    experiment = Path(run_experiment(str(spec)))
    finished(experiment)
    last = {
        json.loads((trial / "params.json").read_text())["learner.lr"]: max(r["step"] for r in metrics(trial))
        for trial in trial_dirs(experiment)
    }
    assert last == {5e-4: 12, 0.5: 2}, last


def test_pb2_explores_the_bounded_space_from_checkpoints(ray_cluster, tmp_path):
    needs("GPy", "GPy")
    needs("sklearn", "scikit-learn")
    spec = write_spec(
        tmp_path,
        {"learner.lr": {"strategy": "loguniform", "values": [1e-5, 3e-3]}},
        {
            "name": "pb2",
            "num_samples": 2,
            "max_concurrent_trials": 2,
            "scheduler": {"name": "pb2", "perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True},
        },
        base={"trainer.total_steps": 8, "learner.lr_schedule": "constant", "learner.warmup_steps": 0},
    )
    experiment = Path(run_experiment(str(spec)))
    finished(experiment)
    restores = [
        json.loads(line)
        for trial in trial_dirs(experiment)
        if (trial / RESTORES_FILE).exists()
        for line in (trial / RESTORES_FILE).read_text().splitlines()
    ]
    assert restores and all(1e-5 <= r["params"]["learner.lr"] <= 3e-3 and r["step"] > 0 for r in restores)
