"""benchmarks/ddp.py's pieces that need no GPU: override merging and reading a run's figures."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("ddp_bench", ROOT / "benchmarks" / "ddp.py")
ddp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ddp)


def test_later_override_replaces_the_same_key():
    base = ["model=gemma3_270m", "quant=none", "train.max_steps=80"]
    merged = ddp.merge_overrides(base, ["model=tiny", "train.max_steps=3", "data=dialogsum_en"])
    assert merged == ["quant=none", "model=tiny", "train.max_steps=3", "data=dialogsum_en"]


def test_figures_come_from_the_run_folder(tmp_path):
    (tmp_path / "train_metrics.json").write_text(json.dumps({"train_tokens_per_second": 12.5}))
    assert ddp._metrics(tmp_path) == {"final_train_tokens_per_second": 12.5}
    with pytest.raises(SystemExit, match="train_metrics.json missing"):
        ddp._metrics(tmp_path / "nothing")


def test_slot_busy_is_trial_time_over_wall_time_and_slots():
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    t0 = datetime(2026, 1, 1)

    def trial(start, seconds):
        begin = t0 + timedelta(seconds=start)
        return SimpleNamespace(
            datetime_start=begin, datetime_complete=begin + timedelta(seconds=seconds)
        )

    # two GPUs, 100 s: one slot ran 90 s of trials, the other 50 s (it idled at the end)
    trials = [
        trial(0, 45),
        trial(45, 45),
        trial(0, 50),
        SimpleNamespace(datetime_start=t0, datetime_complete=None),
    ]
    assert ddp.slot_busy(trials, 100.0, 2) == 0.7
    assert ddp.slot_busy([], 100.0, 2) is None


def test_every_sweep_setup_asks_for_the_same_number_of_trials(tmp_path, monkeypatch):
    import optuna

    asked = []

    def fake_run(cmd, log):  # a "sweep": record the command, add the trials it asks for
        asked.append(cmd)
        get = dict(c.split("=", 1) for c in cmd if "=" in c)
        study = optuna.create_study(
            study_name=get["hydra.sweeper.study_name"], storage=get["hydra.sweeper.storage"]
        )
        for _ in range(int(get["hydra.sweeper.n_trials"])):
            study.add_trial(optuna.trial.create_trial(value=1.0))
        return 10.0

    monkeypatch.setattr(ddp, "_run", fake_run)
    r = ddp.sweep_times(tmp_path, "gemma", 3, 2, 1, cpu=False, overrides=[])
    assert [c for cmd in asked for c in cmd if c.startswith("hydra.sweeper.n_trials")] == [
        "hydra.sweeper.n_trials=3"
    ] * 2
    assert [row["complete"] for row in r["rows"]] == [3, 3] and r["trials"] == 3
