"""Sweep benchmark: what pruning buys at the same trial budget, and what the refit is worth.

    python benchmarks/sweep_pruning.py --data ko=/path/to/dev.csv --data en=/path/to/dev.jsonl
    python benchmarks/sweep_pruning.py --cpu-smoke          # tiny model: checks the script, seconds

For each language, the labelled file is split by id (seeded) into the rows the sweep sees and a
hold-out split of our own that neither the sweep nor the refit sees. On the first part, the same
`sweep=gemma` study (same sampler seed, same trial budget) runs once per setup:

- `none`: no pruning, no ROUGE during training (the plain sweep);
- `median_loss`: the median pruner on eval loss (the usual Optuna + HF setup);
- `wilcoxon`: ROUGE during training, Optuna's WilcoxonPruner on per-row ROUGE against the best trial;
- `hyperband`: ROUGE during training, Hyperband with training steps as the budget;
- `none_cold`, `wilcoxon_cold` (not run unless asked): `none` / `wilcoxon` with each trial's process
  started cold, to measure the warm start (`hydra.sweeper.warm_start`, on by default on GPUs).

Figures per sweep: best validation score, wall time (start to the last trial's end), summed trial time (slot-seconds: comparable when
trials share a GPU), trials complete / pruned, the wall time until a trial came within 0.5 of the
`none` sweep's best (same seed), and for the ROUGE setups the share of trial time spent generating
during training. Sweeps cut at the deadline all end there: for them, compare the time each took
for the first trials that every sweep of its seed finished. The `none` sweep of the first seed also refits (hydra.sweeper.refit=true): its
submission and the best trial's adapter are both scored on the hold-out rows.

Writes <out>/sweep_pruning.json and <out>/sweep_pruning.md (a section for benchmarks/RESULTS.md);
runs and Optuna stores stay under <out>. `--parallel N` runs N sweeps at once: the setups of one
seed side by side share the machine alike, so their wall times stay comparable. `--deadline`
seconds: sweeps not started by then are skipped, running ones are stopped (SIGTERM) with their
finished trials kept, and both are said so (results written after each sweep). Overrides after `--`
go to every sweep.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETUPS = {
    "none": ["trial.pruner.name=none", "trial.intermediate=loss", "train.eval_rouge_rows=0"],
    "median_loss": [
        "trial.pruner.name=median",
        "trial.intermediate=loss",
        "train.eval_rouge_rows=0",
    ],
    "wilcoxon": ["trial.pruner.name=wilcoxon", "trial.intermediate=rouge"],
    # the first rung at the first evaluation (with min_resource=1 every rung below it is judged
    # at that one report)
    "hyperband": [
        "trial.pruner.name=hyperband",
        "trial.intermediate=rouge",
        "trial.pruner.min_resource=${train.eval_steps}",
    ],
}
# trial processes started cold (on GPUs they start warm by default: hydra.sweeper.warm_start)
SETUPS.update(
    {f"{k}_cold": [*SETUPS[k], "hydra.sweeper.warm_start=false"] for k in ("none", "wilcoxon")}
)
DEFAULT_SETUPS = ["none", "median_loss", "wilcoxon", "hyperband"]
GPU_SWEEP = [  # sweep=gemma's own settings; a shorter trial so 4 setups x 2 seeds fit one lease
    "sweep=gemma",
    "tracking.enabled=false",
    "train.max_steps=48",
    "train.eval_steps=12",
    "train.save_steps=12",
    "train.eval_rouge_rows=32",
]
CPU_SWEEP = [  # the tiny random model: the figures only show the script works
    "sweep=tiny_cpu",
    "tracking.enabled=false",
    "train.max_steps=4",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.eval_rouge_rows=4",
    "generate.max_new_tokens=8",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", default=[], help="LANG=PATH (ko, en); repeatable")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the shipped samples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--setups", nargs="+", default=DEFAULT_SETUPS, choices=list(SETUPS))
    ap.add_argument("--gpus", default="[0,0,0,0]", help="hydra.sweeper.gpus (trials at once)")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of rows held out")
    ap.add_argument("--parallel", type=int, default=1, help="sweeps run at the same time")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: sweeps not started by then are skipped, running ones stopped",
    )
    ap.add_argument("--out", default=None, help="default: benchmarks/out/sweep-pruning-<time>")
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every sweep")
    a = ap.parse_args()
    from summarizer.files import write_atomic

    start = time.monotonic()
    out = Path(a.out or ROOT / "benchmarks" / "out" / time.strftime("sweep-pruning-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    if a.cpu_smoke:
        samples = ROOT / "data" / "samples"
        langs = {"en": samples / "dialogsum_en.jsonl"}
        base, gpus = CPU_SWEEP, None
    else:
        langs = dict(d.split("=", 1) for d in a.data) if a.data else {}
        if not langs:
            ap.error("--data LANG=PATH (or --cpu-smoke)")
        base, gpus = GPU_SWEEP, a.gpus
    result = {"trials": a.trials, "seeds": a.seeds, "base": base + a.overrides, "sweeps": []}
    jobs = []
    for lang, path in langs.items():
        labelled, holdout = split_holdout(Path(path), out / "data" / lang, a.holdout)
        data = [f"data=dialogsum_{lang}", f"data.path={labelled}", f"data.test_path={holdout}"]
        result.setdefault("data", {})[lang] = {"labelled": str(labelled), "holdout": str(holdout)}
        jobs += [(lang, seed, setup, data, holdout) for seed in a.seeds for setup in a.setups]
    result["parallel"] = a.parallel
    deadline = start + a.deadline if a.deadline else None
    lock = threading.Lock()
    order = {job[:3]: i for i, job in enumerate(jobs)}  # (lang, seed, setup) -> place

    def one(job) -> None:
        lang, seed, setup, data, holdout = job
        if deadline and time.monotonic() > deadline:
            r = {"skipped": "deadline"}
        else:
            refit = setup == "none" and seed == a.seeds[0]
            name = f"{lang}_{setup}_s{seed}"
            args = [*base, *data, *SETUPS[setup], *a.overrides]
            r = sweep(out, name, args, seed, a.trials, gpus, refit, deadline)
            if refit and not r.get("cut"):
                r["refit"] = refit_value(out / name, holdout, lang, r)
        r.update({"lang": lang, "seed": seed, "setup": setup})
        with lock:  # results written after each sweep, in the jobs' order
            result["sweeps"].append(r)
            result["sweeps"].sort(key=lambda x: order[(x["lang"], x["seed"], x["setup"])])
            summarise(result)
            write_atomic(out / "sweep_pruning.json", json.dumps(result, indent=1))
            write_atomic(out / "sweep_pruning.md", markdown(result))

    # --parallel N: N sweeps at once (matched setups side by side share the machine alike)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.parallel)) as pool:
        for f in [pool.submit(one, job) for job in jobs]:
            f.result()
    print(markdown(result))


def split_holdout(path: Path, folder: Path, share: float) -> tuple[Path, Path]:
    """The labelled file cut by id (seeded) into the sweep's rows and our own hold-out rows, in the
    file's own format (CSV or JSONL)."""
    from summarizer.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    key = "fname" if "fname" in rows[0] else next(iter(rows[0]))
    ids = sorted(r[key] for r in rows)
    random.Random(1234).shuffle(ids)
    held = set(ids[: round(share * len(ids))])
    parts = {"labelled": [r for r in rows if r[key] not in held],
             "holdout": [r for r in rows if r[key] in held]}  # fmt: skip
    paths = []
    for name, part in parts.items():
        p = folder / f"{name}{path.suffix}"
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
            write_atomic(p, text)
        else:
            with p.open("w", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(part)
        paths.append(p)
    return paths[0], paths[1]


def sweep(
    out: Path, name: str, args: list[str], seed: int, trials: int, gpus, refit: bool, deadline
) -> dict:
    folder, store = out / name, f"sqlite:///{out / name}.db"
    cmd = [
        sys.executable, "-m", "summarizer", "--multirun", *args,
        f"hydra.sweep.dir={folder}", f"hydra.sweeper.storage={store}",
        f"hydra.sweeper.study_name={name}", f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.sampler.seed={seed}", f"hydra.sweeper.refit={str(refit).lower()}",
        "hydra.sweeper.report=false",
    ]  # fmt: skip
    if gpus:
        cmd.append(f"hydra.sweeper.gpus={gpus}")
    log = out / f"{name}.log"
    t0 = time.time()
    cut = False
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env())
        try:
            rc = proc.wait(
                timeout=None if deadline is None else max(1, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired:  # past the deadline: stop it, keep its finished trials
            cut = True
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    wall = time.time() - t0
    r = {"name": name, "returncode": rc, "command_s": wall}
    if cut:
        r["cut"] = "deadline: stopped, its finished trials kept"
    r.update(study_figures(store, name, t0))
    # the trials' wall time: from the start to the last trial's end (a refit runs after it)
    r["wall_s"] = max((t["ended_at"] for t in r["trials"]), default=wall)
    return r


def study_figures(store: str, name: str, t0: float) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=store)
    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rouge_s = None
        folder = t.user_attrs.get("output_dir")
        if folder and (Path(folder) / "train_metrics.json").is_file():
            figures = json.loads((Path(folder) / "train_metrics.json").read_text())
            rouge_s = figures.get("eval_rouge_seconds_total")
        trials.append({
            "number": t.number, "state": t.state.name, "value": t.value, "seconds": seconds,
            "ended_at": t.datetime_complete.timestamp() - t0, "rouge_seconds": rouge_s,
            "params": t.params,
        })  # fmt: skip
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    rouge = [t for t in trials if t["rouge_seconds"] is not None]
    return {
        "trials": trials,
        "complete": len(done),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "failed": sum(t["state"] == "FAIL" for t in trials),
        "best": max((t["value"] for t in done), default=None),
        "trial_seconds": sum(t["seconds"] for t in trials),
        "rouge_share": (
            sum(t["rouge_seconds"] for t in rouge) / sum(t["seconds"] for t in rouge)
            if rouge else None
        ),
    }  # fmt: skip


def summarise(result: dict) -> None:
    """Per sweep: wall time until a trial came within 0.5 of the plain sweep's best (same language
    and seed), and the ratios to the plain sweep."""
    plain = {(r["lang"], r["seed"]): r for r in result["sweeps"] if r.get("setup") == "none"}
    for r in result["sweeps"]:
        ref = plain.get((r["lang"], r["seed"]))
        if "trials" not in r or not ref or ref.get("best") is None:
            continue
        target = ref["best"] - 0.5
        hits = [t["ended_at"] for t in r["trials"] if t["value"] is not None
                and t["state"] == "COMPLETE" and t["value"] >= target]  # fmt: skip
        r["target"] = target
        r["time_to_target_s"] = min(hits) if hits else None
        r["wall_ratio"] = r["wall_s"] / ref["wall_s"]
        r["trial_seconds_ratio"] = r["trial_seconds"] / ref["trial_seconds"]
    # Sweeps cut at a deadline all end at the deadline, so their wall ratios say nothing: compare
    # instead the time each took for the first trials that every sweep of its seed finished.
    groups: dict[tuple, list[dict]] = {}
    for r in result["sweeps"]:
        if "trials" in r:
            groups.setdefault((r["lang"], r["seed"]), []).append(r)
    for key, group in groups.items():
        n = min(_finished_prefix(r["trials"]) for r in group)
        for r in group:
            ends = [t["ended_at"] for i, t in enumerate(r["trials"]) if t.get("number", i) < n]
            r["first_trials"], r["first_trials_s"] = n, (max(ends) if n else None)
        ref = plain.get(key)  # a skipped plain sweep has no first trials
        for r in group:
            if ref and ref.get("first_trials_s"):
                r["first_trials_ratio"] = r["first_trials_s"] / ref["first_trials_s"]


def _finished_prefix(trials: list[dict]) -> int:
    """How many trials, counted from trial 0, ran to their end (complete or pruned)."""
    done = {
        t.get("number", i) for i, t in enumerate(trials) if t["state"] in ("COMPLETE", "PRUNED")
    }
    n = 0
    while n in done:
        n += 1
    return n


def refit_value(folder: Path, holdout: Path, lang: str, r: dict) -> dict:
    """The refit's submission and the best trial's adapter, both scored on the hold-out rows."""
    from summarizer import metrics
    from summarizer.config import TaskConfig

    refs = _references(holdout)
    tok = metrics.resolve_tokenizer("auto", lang)
    out = {}
    sub = folder / "submission.csv"
    if sub.is_file():
        out["refit"] = _score(metrics, TaskConfig(), _predictions(sub), refs, tok)
    done = [t for t in r.get("trials", []) if t["state"] == "COMPLETE" and t["value"] is not None]
    if done:
        best = max(done, key=lambda t: t["value"])
        trial_dir = _trial_dir(folder, best["number"])
        pred = folder / f"holdout_best_trial_{best['number']}.csv"
        cmd = [sys.executable, "-m", "summarizer.cli.predict", str(trial_dir),
               "--input", str(holdout), "--output", str(pred)]  # fmt: skip
        with (folder.parent / f"{folder.name}-predict.log").open("w") as f:
            subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env())
        if pred.is_file():
            out["best_trial"] = _score(metrics, TaskConfig(), _predictions(pred), refs, tok)
            out["best_trial"]["number"] = best["number"]
    out["holdout_rows"] = len(refs)
    return out


def _trial_dir(folder: Path, number: int) -> Path:
    return sorted(folder.glob(f"trial_{number:04d}*"))[-1]


def _references(path: Path) -> dict[str, str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    return {r["fname"]: r["summary"] for r in rows}


def _predictions(path: Path) -> dict[str, str]:
    with path.open(encoding="utf-8", newline="") as f:
        return {r["fname"]: r["summary"] for r in csv.DictReader(f)}


def _score(metrics, task, preds: dict, refs: dict, tok: str) -> dict:
    ids = sorted(refs)
    missing = [i for i in ids if i not in preds]
    if missing:
        return {"error": f"{len(missing)} hold-out rows without a prediction"}
    return metrics.score(task, [preds[i] for i in ids], [refs[i] for i in ids], tok)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _first(r: dict) -> str:
    if not r.get("first_trials"):
        return "-"
    return (
        f"{r['first_trials']}: {r['first_trials_s']:.0f} ({_f(r.get('first_trials_ratio'), '.2f')})"
    )


def markdown(result: dict) -> str:
    lines = [
        f"Trial budget {result['trials']} per sweep, sampler seeds {result['seeds']}, "
        f"{result.get('parallel', 1)} sweep(s) at a time; "
        f"settings: `{' '.join(result['base'])}`.",
        "",
        "| lang | seed | setup | best | complete / pruned / failed | wall s | wall ratio | "
        "trial s ratio | first trials every sweep finished: s (ratio) | "
        "to within 0.5 of plain best (s) | ROUGE share of trial time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["sweeps"]:
        if "skipped" in r:
            lines.append(f"| {r['lang']} | {r['seed']} | {r['setup']} | skipped ({r['skipped']}) "
                         "| | | | | | | |")  # fmt: skip
            continue
        setup = r["setup"] + (" (cut at the deadline)" if r.get("cut") else "")
        lines.append(
            f"| {r['lang']} | {r['seed']} | {setup} | {_f(r.get('best'), '.2f')} | "
            f"{r.get('complete')} / {r.get('pruned')} / {r.get('failed')} | "
            f"{_f(r.get('wall_s'), '.0f')} | {_f(r.get('wall_ratio'), '.2f')} | "
            f"{_f(r.get('trial_seconds_ratio'), '.2f')} | {_first(r)} | "
            f"{_f(r.get('time_to_target_s'), '.0f')} | "
            f"{_f(r.get('rouge_share'), '.1%')} |"
        )
    for r in result["sweeps"]:
        if r.get("refit"):
            f = r["refit"]
            lines += ["", f"Refit ({r['lang']}, {f.get('holdout_rows')} hold-out rows): "
                      f"refit {_f(f.get('refit', {}).get('rouge_sum'), '.2f')} vs best trial "
                      f"{_f(f.get('best_trial', {}).get('rouge_sum'), '.2f')} (ROUGE-1+2+L F1)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
