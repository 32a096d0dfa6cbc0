"""benchmarks/sweep_pruning.py's and benchmarks/decoding.py's pieces that need no GPU: the hold-out
split, the figures relative to the plain sweep, and the scoring of a run folder."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sp = _load("sweep_pruning")
dec = _load("decoding")


def test_the_hold_out_split_is_seeded_by_id_and_disjoint(tmp_path):
    src = ROOT / "data" / "samples" / "dialogsum_en.jsonl"
    lab, held = sp.split_holdout(src, tmp_path / "a", 0.25)
    again = sp.split_holdout(src, tmp_path / "b", 0.25)
    ids = [json.loads(x)["fname"] for x in src.read_text().splitlines() if x]
    lab_ids = [json.loads(x)["fname"] for x in lab.read_text().splitlines()]
    held_ids = [json.loads(x)["fname"] for x in held.read_text().splitlines()]
    assert sorted(lab_ids + held_ids) == sorted(ids) and not set(lab_ids) & set(held_ids)
    assert len(held_ids) == round(0.25 * len(ids))
    assert held.read_text() == again[1].read_text()  # the same rows held out every time
    csv_src = ROOT / "data" / "samples" / "dialogsum_ko.csv"
    _, held_csv = sp.split_holdout(csv_src, tmp_path / "c", 0.2)
    with held_csv.open(encoding="utf-8", newline="") as f:
        assert {"fname", "dialogue", "summary"} <= set(next(csv.DictReader(f)))


def _sweep(setup, wall, trials):
    return {"lang": "ko", "seed": 42, "setup": setup, "wall_s": wall, "trials": trials,
            "trial_seconds": sum(t["seconds"] for t in trials),
            "best": max(t["value"] for t in trials if t["value"] is not None)}  # fmt: skip


def test_time_to_target_and_ratios_are_against_the_plain_sweep_of_the_same_seed():
    def t(value, ended, seconds=10, state="COMPLETE"):
        return {"value": value, "ended_at": ended, "seconds": seconds, "state": state}

    plain = _sweep("none", 100, [t(80.0, 30), t(85.0, 90), t(70.0, 100)])
    pruned = _sweep("wilcoxon", 50, [t(84.6, 20), t(12.0, 25, 3, "PRUNED"), t(85.2, 45)])
    result = {"trials": 3, "seeds": [42], "base": [], "sweeps": [plain, pruned]}
    sp.summarise(result)
    assert plain["time_to_target_s"] == 90 and pruned["time_to_target_s"] == 20  # >= 84.5
    assert pruned["wall_ratio"] == 0.5 and pruned["trial_seconds_ratio"] == 23 / 30
    table = sp.markdown(result)
    assert "| ko | 42 | wilcoxon | 85.20 | None / None / None | 50 | 0.50 |" in table
    # every sweep finished its 3 trials: the first-trials figure is the whole sweep's
    assert pruned["first_trials"] == 3 and pruned["first_trials_ratio"] == 0.45
    assert "| 3: 45 (0.45) |" in table


def test_sweeps_cut_at_the_deadline_compare_the_trials_all_of_them_finished():
    def t(number, ended, state="COMPLETE"):
        return {"number": number, "value": 80.0, "ended_at": ended, "seconds": 10, "state": state}

    plain = _sweep("none", 450, [t(0, 100), t(1, 300), t(2, 440), t(3, 450, "FAIL")])
    pruned = _sweep("wilcoxon", 450, [t(0, 110), t(1, 200, "PRUNED"), t(3, 450, "FAIL"),
                                      t(2, 400)])  # fmt: skip
    behind = _sweep("hyperband", 450, [t(0, 120), t(1, 320), t(2, 450, "FAIL")])
    result = {"trials": 4, "seeds": [42], "base": [], "sweeps": [plain, pruned, behind]}
    sp.summarise(result)
    assert [r["first_trials"] for r in (plain, pruned, behind)] == [2, 2, 2]
    assert [r["first_trials_s"] for r in (plain, pruned, behind)] == [300, 200, 320]
    assert pruned["first_trials_ratio"] == 200 / 300 and pruned["wall_ratio"] == 1.0


def test_a_decoding_row_scores_the_predictions_both_ways(tmp_path):
    run = tmp_path / "en_mbr8"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"state": "COMPLETE", "metrics": {"rouge1": 1.0}}))
    with (run / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "prediction", "reference"])
        w.writerow(["a", "#Person1# buys a car.", "#Person1# buys a new car."])
    row = dec._row("en", "mbr8", run, {"returncode": 0, "wall_s": 1.0}, "en")
    assert row["rows"] == 1 and row["rouge1"] == 1.0 and 0 < row["final_whole"] <= 100
    failed = dec._row("en", "beam4", tmp_path / "missing", {"returncode": 1, "wall_s": 1.0}, "en")
    assert failed["error"].startswith("exit 1")
    assert "| en | beam4 | exit 1" in dec.markdown({"settings": [], "rows": [row, failed]})


def _predictions(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"metrics": {"rouge1": 1.0}}))
    with (folder / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fname", "prediction", "reference"])
        w.writerows(rows)


def test_rescore_merges_folders_and_compares_each_variant_with_greedy_row_by_row(tmp_path):
    refs = [
        ("a", "#Person1# buys a new car."),
        ("b", "#Person2# sells a house."),
        ("c", "They eat."),
    ]
    for name, part in (("greedy", "x"), ("mbr8", "y")):
        out = tmp_path / part
        _predictions(out / "en_sft", [(i, "They talk.", r) for i, r in refs])
        if name == "mbr8":  # every row nearer its reference than greedy's
            _predictions(out / "en_mbr8", [(i, r.replace(".", " now."), r) for i, r in refs])
        run = {"lang": "en", "variant": name, "returncode": 0, "wall_s": 1.0}
        (out / "decoding.json").write_text(json.dumps({"settings": ["s=1"], "rows": [run]}))
    result = dec.rescore([tmp_path / "x", tmp_path / "y"])
    greedy, mbr = result["rows"]
    assert result["settings"] == {"en": ["s=1"]} and "vs_greedy" not in greedy
    v = mbr["vs_greedy"]
    assert v["mean_diff"] == pytest.approx(mbr["final_split"] - greedy["final_split"])
    assert 0 < v["low"] <= v["mean_diff"] <= v["high"]
    assert f"| +{v['mean_diff']:.2f} [" in dec.markdown(result)
    (tmp_path / "y" / "decoding.json").write_text(
        json.dumps({"settings": ["s=2"], "rows": [{"lang": "en", "variant": "mbr8"}]})
    )
    with pytest.raises(SystemExit, match="other en settings"):
        dec.rescore([tmp_path / "x", tmp_path / "y"])


def test_a_sweep_still_running_at_the_deadline_is_stopped_and_marked_cut(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    real = subprocess.Popen
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(sp.subprocess, "Popen", lambda cmd, **kw: real(sleeper, **kw))
    monkeypatch.setattr(sp, "study_figures", lambda store, name, t0: {"trials": []})
    t0 = time.monotonic()
    r = sp.sweep(tmp_path, "ko_none_s42", [], 42, 3, None, False, time.monotonic() + 1)
    assert time.monotonic() - t0 < 30 and r["cut"].startswith("deadline")
    assert r["returncode"] != 0  # stopped by SIGTERM, not finished
    assert "(cut at the deadline)" in sp.markdown(
        {
            "trials": 3,
            "seeds": [42],
            "base": [],
            "sweeps": [{**r, "lang": "ko", "seed": 42, "setup": "none"}],
        }
    )
