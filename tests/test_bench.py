"""recipes/bench.py: one tiny launch writes the report and finds every exact strategy exact; its pieces."""

import json
from pathlib import Path

import pytest

import codedgrad
from codedgrad.emulate import Heterogeneity
from codedgrad.recipes.bench import CostCurve, balanced_counts, ideal_bound, load_cluster, predicted_step, unit_factors

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "recipes" / "bench.py"

TINY = [
    "run_workloads=[cnn]",
    "run_profiles=[hetero4_stalls]",
    "strategies=[ddp,coded]",
    "workloads.cnn.num_tasks=4",
    "workloads.cnn.samples_per_task=2",
    "sizes=[1,2,4]",
    "repeats=1",
    "warmup=3",
    "exact_checks=2",
    "rounds=2",
    "block=2",
    "accuracy.strategies=[ddp,coded]",
    "accuracy.num_tasks=4",
    "accuracy.samples_per_task=2",
    "accuracy.max_steps=4",
    "accuracy.block=2",
    "accuracy.target=1.01",  # never reached: the run stops at max_steps
    "engine.timeout=60",
]


@pytest.mark.distributed
def test_tiny_bench_reports_every_field_and_exact_gradients(torchrun, tmp_path: Path) -> None:
    torchrun(BENCH, 2, [*TINY, f"out_dir={tmp_path}"], timeout=240)
    (run,) = tmp_path.iterdir()
    assert {p.name for p in run.iterdir()} == {"bench.json", "bench.png", "accuracy.png"}
    report = json.loads((run / "bench.json").read_text())
    assert report["world_size"] == 2
    # The code measured: this checkout's package (tests run from it), at its commit.
    assert report["code"]["package"] == str(Path(codedgrad.__file__).resolve().parent)
    assert report["code"]["commit"] is None or len(report["code"]["commit"]) == 40
    cnn = report["workloads"]["cnn"]
    assert cnn["compute_curve"]["sizes"] == [1, 2, 4] and all(s > 0 for s in cnn["compute_curve"]["seconds"])
    profile = cnn["profiles"]["hetero4_stalls"]
    assert "mode=compute" in profile["emulation"] and profile["ideal_seconds"] > profile["allreduce_seconds_during"] > 0
    assert profile["ideal_seconds_warmup_curve"] > cnn["allreduce_seconds"] > 0
    assert len(profile["compute_curve_during"]["seconds"]) == 3
    assert sum(profile["balanced_counts"]) == 4 and profile["balanced_counts"][0] <= profile["balanced_counts"][1]
    strategies = profile["strategies"]
    assert set(strategies) == {"ddp", "coded"}
    for name, entry in strategies.items():
        assert len(entry["step_seconds"]) == 4 and all(t > 0 for t in entry["step_seconds"]), name
        assert entry["p90_seconds"] >= entry["median_seconds"] > 0, name
        assert entry["ratio_to_ideal"] == pytest.approx(entry["median_seconds"] / profile["ideal_seconds"]), name
        # The bench compared the decoded gradient with a single process's on the same global batch.
        assert entry["exact"] and entry["gradient_relative_error"] < 1e-5, (name, entry["gradient_relative_error"])
        assert entry["speedup_over_balanced"] is None, name  # balanced did not run
    assert strategies["ddp"]["speedup_over_ddp"] == 1.0
    coded_ranks = strategies["coded"]["per_rank"]
    assert len(coded_ranks) == 2 and all(r["computed"] >= 1 and r["redundancy"] >= 1 for r in coded_ranks)
    assert strategies["coded"]["per_rank"][0]["emulated_seconds"] > 0  # rank 0 is the slow one: it sleeps
    accuracy = report["accuracy"]
    assert accuracy["steps"] == 4 and accuracy["seconds_to_target"] == {"ddp": None, "coded": None}
    assert [len(c) for c in accuracy["curves"].values()] == [2, 2]
    assert all(0 <= point[2] <= 1 for points in accuracy["curves"].values() for point in points)


def test_cost_curve_interpolates_and_finds_the_best_batch() -> None:
    curve = CostCurve((1, 2, 4), (1.0, 1.5, 2.0))
    assert curve(3) == pytest.approx(1.75) and curve(8) == pytest.approx(4.0) and curve(0) == 0.0
    assert curve.best_throughput() == (4, 2.0)
    with pytest.raises(ValueError, match="sizes"):
        CostCurve((2, 1), (1.0, 1.0))


def test_balanced_counts_are_batch_size_aware_and_the_bound_pools_capacity() -> None:
    linear = CostCurve((1, 8), (1.0, 8.0))
    assert balanced_counts(linear, [4.0, 1.0], 10) == [2, 8]  # ∝ speed when a task costs the same at any size
    assert predicted_step(linear, [4.0, 1.0], [2, 8], 0.5) == pytest.approx(8.5)
    # A batch of 8 costs 4 single tasks: the bound takes each rank at its best throughput (2 tasks/s).
    efficient = CostCurve((1, 8), (1.0, 4.0))
    assert ideal_bound(efficient, [1.0, 1.0], 8, 0.1) == pytest.approx(8 / 4 + 0.1)
    with pytest.raises(ValueError, match="num_tasks"):
        balanced_counts(linear, [1.0, 1.0, 1.0], 2)


def test_unit_factors_and_clusters() -> None:
    het = Heterogeneity(speeds=[1, 2, 4], base=0.01, jitter=0.0, mode="compute")
    assert unit_factors(het) == pytest.approx([4.0, 2.0, 1.0])
    cluster = load_cluster("hetero4_stalls", REPO / "conf")
    assert cluster["speeds"] == [1, 1, 2, 4] and cluster["stall_prob"] == 0.01 and cluster["name"] == "hetero4_stalls"
    assert cluster["jitter"] == 0.5  # from homogeneous, two levels down the defaults
    with pytest.raises(ValueError, match="no cluster 'mars'"):
        load_cluster("mars", REPO / "conf")
