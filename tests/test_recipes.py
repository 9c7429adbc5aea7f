"""The Hydra recipes: models, data, configs, the run directory, and short distributed runs read back
from TensorBoard.

One torchrun launch per strategy (2 ranks, ``cluster=hetero4``, a few steps) through
``recipes/train.py`` and Hydra overrides, plus one launch through Lightning's own launcher
(``python recipes/train.py trainer.devices=2``). Strategies whose module does not exist yet are
skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from codedgrad.recipes.datamodules import DigitsData, RegressionData, TextData, build_datamodule, stdlib_dir
from codedgrad.recipes.emulation import build_emulation, fit_speeds, pooled_bound
from codedgrad.recipes.models import build_model
from codedgrad.recipes.module import RecipeModule
from codedgrad.recipes.rundir import rank_label, register_resolvers, run_name
from tests.conftest import REPO_ROOT, run_torchrun

TRAIN = REPO_ROOT / "recipes" / "train.py"
CONF = REPO_ROOT / "conf"
RANKS = 2
# Short runs: 5 steps, per-rank scalars every 2 steps (0, 2, 4), figures at steps 0 and 4.
SHORT_RUN = [
    "cluster=hetero4",
    "trainer.max_steps=5",
    "trainer.log_every_n_steps=2",
    "monitor.figure_every_n_steps=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "+trainer.num_sanity_val_steps=0",
    "+trainer.limit_val_batches=2",
]
RANK_SCALARS = ("step_time", "computed")


# -- models, data, configs (no processes) ----------------------------------------------------------


def test_models_fit_their_data() -> None:
    digits, text = DigitsData(batch_size=4), TextData(seq_len=16, num_files=2, max_chars=5000, batch_size=4)
    regression = RegressionData(num_samples=64, num_features=5)
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (4, 8, 8) and y.dtype == torch.long
    for name in ("mlp", "cnn"):
        assert build_model({"name": name}, digits.describe())(x).shape == (4, 10)
    tokens, targets = next(iter(text.train_dataloader()))
    vocab = len(text.vocab)
    small = {"name": "transformer", "d_model": 16, "heads": 2, "layers": 1, "ff": 32}
    out = build_model(small, text.describe())(tokens)
    assert out.shape == (4, 16, vocab) and targets.shape == (4, 16)
    xr, _ = next(iter(regression.train_dataloader()))
    assert build_model({"name": "mlp"}, regression.describe())(xr).shape == (32, 1)
    with pytest.raises(ValueError, match="model=cnn"):
        build_model({"name": "cnn"}, text.describe())
    with pytest.raises(ValueError, match="model=transformer"):
        build_model({"name": "transformer"}, digits.describe())


def test_data_is_local_seeded_and_split() -> None:
    digits = build_datamodule({"name": "digits", "batch_size": 8, "val_fraction": 0.2}, seed=3)
    assert len(digits.train_set) + len(digits.val_set) == 1797  # sklearn's copy, no download
    again = build_datamodule({"name": "digits", "batch_size": 8, "val_fraction": 0.2}, seed=3)
    assert torch.equal(digits.val_set.tensors[1], again.val_set.tensors[1])
    text = TextData(seq_len=32, num_files=3, max_chars=20_000)
    # The text is the standard library's own source, read from the directory of os.py.
    assert stdlib_dir() == Path(os.__file__).resolve().parent
    assert all(p.parent == stdlib_dir() and p.suffix == ".py" for p in text.files)
    assert text.text.startswith(text.files[0].read_text(encoding="utf-8")[:1000])
    x, y = text.train_set.tensors
    assert x.shape[1] == 32 and torch.equal(x[:, 1:], y[:, :-1])  # targets: the next character
    named = TextData(files=["os.py"], max_chars=3000)
    assert "def " in named.text and named.files == [stdlib_dir() / "os.py"]


def test_training_step_returns_the_batch_mean_loss() -> None:
    """A batch's loss is the mean of its halves' losses: what a coded strategy's task split relies on."""
    data = DigitsData(batch_size=8)
    module = RecipeModule(build_model({"name": "cnn"}, data.describe()), data.kind)
    x, y = next(iter(data.train_dataloader()))
    whole = module._loss_and_metric((x, y))[0]
    halves = [module._loss_and_metric((x[i : i + 4], y[i : i + 4]))[0] for i in (0, 4)]
    assert torch.allclose(whole, sum(halves) / 2, rtol=1e-6)


def test_every_config_composes_and_emulates() -> None:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for cluster in ("homogeneous", "hetero4", "stragglers", "drift"):
            cfg = compose("train", overrides=[f"cluster={cluster}"])
            het = build_emulation(cfg.cluster, 4)
            assert het is not None and het.world_size == 4
        for strategy in ("ddp", "balanced", "coded"):
            assert compose("train", overrides=[f"strategy={strategy}"]).strategy.name == strategy
        assert compose("train", overrides=["strategy=coded"]).strategy.num_tasks == 16
        for model, data in (("mlp", "regression"), ("transformer", "text"), ("cnn", "digits")):
            cfg = compose("train", overrides=[f"model={model}", f"data={data}"])
            assert cfg.model.name == model and cfg.data.name == data
    drift = build_emulation({"speeds": [1, 1, 2, 4], "base": 0.01, "change_step": 5, "change_speeds": [4, 2, 1, 1]}, 4)
    assert pooled_bound(drift, 16, 0) == pytest.approx(16 * 0.01 / 8)
    assert pooled_bound(drift, 16, 5) == pytest.approx(16 * 0.01 / 8)
    assert build_emulation({"speeds": None, "base": 0.01}, 3).speeds == (1.0, 1.0, 1.0)
    assert build_emulation({"enabled": False, "base": 0.01}, 3) is None
    assert fit_speeds([1, 1, 2, 4], 2) == (1.0, 4.0)  # fewer ranks: keep the slowest and the fastest
    assert fit_speeds([1, 2], 5) == (1.0, 2.0, 1.0, 2.0, 1.0)


def test_run_name_and_rank_label(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abcdef0123456789")
    assert run_name().endswith("_abcdef01")  # the torchrun id: equal on every rank of a job
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert "_" in run_name()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher sets only LOCAL_RANK/NODE_RANK
    assert rank_label() == "1"
    monkeypatch.setenv("RANK", "3")
    assert rank_label() == "3"


# -- short distributed runs, read back from TensorBoard ---------------------------------------------


def _events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _check_run_dir(run_dir: Path, extra_rank_scalars: tuple[str, ...] = ()) -> None:
    """One shared directory: a log per rank, rank 0's Hydra config, metrics, scalars and figures."""
    for rank in range(RANKS):
        log = (run_dir / f"rank{rank}.log").read_text()
        assert "EMULATED heterogeneity" in log and "final metrics" in log, log
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 5 and "val/loss" in metrics
    events = _events(run_dir)
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"perf/step_time", "perf/bound_ratio", "train/loss"} <= scalars, scalars
    wanted = {f"rank{r}/{name}" for r in range(RANKS) for name in (*RANK_SCALARS, *extra_rank_scalars)}
    assert wanted <= scalars, wanted - scalars
    assert [e.step for e in events.Scalars("rank1/step_time")] == [0, 2, 4]
    assert all(e.value > 0 for e in events.Scalars("perf/bound_ratio"))
    assert {"figures/load_split", "figures/timeline"} <= images, images
    assert [e.step for e in events.Images("figures/timeline")] == [0, 4]


def _strategy_module_missing(strategy: str) -> str | None:
    if strategy == "ddp":
        return None
    try:
        found = importlib.util.find_spec(f"codedgrad.lightning.{strategy}") is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"codedgrad/lightning/{strategy}.py does not exist yet (built in parallel)"


def _torchrun(strategy: str, parent: Path) -> Path:
    """Launch the short run of ``strategy`` under ``parent``; return its run directory."""
    # The run directory is named by the resolver on each rank: exactly one directory means they agreed.
    run_dir_arg = f"hydra.run.dir={parent}/${{codedgrad_run_name:}}"
    run_torchrun(TRAIN, RANKS, [f"strategy={strategy}", *SHORT_RUN, run_dir_arg], timeout=240)
    (run_dir,) = parent.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ddp run, shared with the launcher test (which must reproduce its losses)."""
    return _torchrun("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "balanced", "coded"])
def test_torchrun_recipe(strategy: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    missing = _strategy_module_missing(strategy)
    if missing:
        pytest.skip(missing)
    run_dir = request.getfixturevalue("ddp_run") if strategy == "ddp" else _torchrun(strategy, tmp_path)
    extra = ("time_waited",) if strategy == "ddp" else ()
    if strategy == "coded":
        extra = ("used", "purged", "spare", "time_waited", "plan_version", "stalls_seen")
    _check_run_dir(run_dir, extra)
    if strategy == "ddp":  # the slow rank (speed 1) waits for nobody; the fast one (speed 4) waits
        events = _events(run_dir)
        assert all(e.value == 0 for e in events.Scalars("rank0/time_waited"))
        assert all(e.value > 0 for e in events.Scalars("rank1/time_waited"))


@pytest.mark.distributed
def test_lightning_launcher_shares_the_run_dir(tmp_path: Path, ddp_run: Path) -> None:
    """``python recipes/train.py trainer.devices=2``: Lightning starts rank 1 with rank 0's run directory,
    and the run reproduces the torchrun run's losses exactly (seeded; the emulation only sleeps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    run_dir = tmp_path / "run"
    command = [sys.executable, str(TRAIN), f"trainer.devices={RANKS}", *SHORT_RUN, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    _check_run_dir(run_dir, ("time_waited",))
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, ddp_run))
    assert (ours["train/loss"], ours["val/loss"]) == (theirs["train/loss"], theirs["val/loss"])
