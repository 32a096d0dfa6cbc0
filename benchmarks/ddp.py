"""Multi-GPU benchmark: DDP throughput and one-trial-per-GPU sweep wall time.

    python benchmarks/ddp.py                          # a GPU host with >= 2 GPUs (all visible ones)
    python benchmarks/ddp.py --trials 8 -- data.path=/path/to/dev.csv
    python benchmarks/ddp.py --cpu-smoke              # tiny model, 2 gloo processes: checks the script

Two measurements, through the real command line (`python -m summarizer`):

1. Throughput: the same training run with distributed=single, with distributed=ddp at the same
   global batch (train.batch_size / N per GPU: the same updates, so the same losses within float
   noise), and with distributed=ddp at the same batch per GPU (N x the global batch: the usual DDP
   scaling figure).
   Tokens/s is the pipeline's final_train_tokens_per_second (non-padding training tokens of all
   ranks over the training wall time), read from the run's train_metrics.json.
2. Sweep: the same N-trial sweep with one trial per GPU on 1 GPU (hydra.sweeper.gpus=[0]) and on all
   of them (gpus=auto), `--per-gpu K` trials per GPU in both. The random sampler with a fixed seed
   and no pruner make both sweeps run the same trials; the figure is the ratio of wall times (goal
   <= 0.55 on 2 GPUs).

Writes <out>/ddp.json and <out>/ddp.md (a section for benchmarks/RESULTS.md); runs, MLflow and
Optuna stores stay under <out>. Overrides after `--` go to every run (data, model path ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPU_RUN = [  # Gemma 3 270M in bf16; one evaluation at the end for the losses
    "model=gemma3_270m",
    "quant=none",
    "train.max_steps=80",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.gradient_checkpointing=false",
    "train.optim=adamw_torch_fused",  # as sweep=gemma: a small bf16 model needs no paged optimizer
    "train.eval_steps=80",
    "train.save_steps=80",
    "train.early_stopping_patience=0",
    "stages.evaluate=false",
]
CPU_RUN = [  # the tiny random model: seconds; the figures only show the script works
    "model=tiny",
    "quant=none",
    "train=debug",
    "train.max_steps=4",
    "train.batch_size=4",
    "train.eval_steps=4",
    "train.save_steps=4",
    "train.eval_rows=8",
    "train.max_length=384",
    "stages.evaluate=false",
]
SWEEP_FIXED = [  # the same trials whatever the number of workers
    "hydra.sweeper.sampler.name=random",
    "hydra.sweeper.sampler.seed=42",
    "trial.pruner.name=none",
    "hydra.sweeper.report=false",
    "tracking.log_adapter=false",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 CPU processes (gloo)")
    ap.add_argument("--nproc", default="auto", help="GPUs for DDP and the sweep (default: all)")
    ap.add_argument("--sweep", default=None, help="sweep preset (default: gemma; tiny_cpu on CPU)")
    ap.add_argument("--trials", type=int, default=None, help="trials per sweep (8; 2 on CPU)")
    ap.add_argument("--per-gpu", type=int, default=1, help="trials at once on each GPU")
    ap.add_argument("--only", choices=("throughput", "sweep"), default=None)
    ap.add_argument("--out", default=None, help="default: benchmarks/out/ddp-<time>")
    ap.add_argument(
        "--no-mlflow", action="store_true", help="tracking.enabled=false (a machine without mlflow)"
    )
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    args = ap.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    if args.cpu_smoke:
        n, device = 2, f"CPU ({os.cpu_count()} cores), gloo"
    else:
        if gpus < 2:
            sys.exit(f"error: {gpus} GPU(s) visible; this benchmark needs 2+ (or --cpu-smoke)")
        n = gpus if args.nproc == "auto" else int(args.nproc)
        device = f"{n} x {torch.cuda.get_device_name(0)}"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "benchmarks" / "out" / f"ddp-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": device, "processes": n, "date": stamp, "overrides": args.overrides}
    extra = list(args.overrides) + (["tracking.enabled=false"] if args.no_mlflow else [])
    if args.only != "sweep":
        base = merge_overrides(CPU_RUN if args.cpu_smoke else GPU_RUN, extra)
        results["throughput"] = throughput(out, base, n, args.cpu_smoke)
    if args.only != "throughput":
        sweep = args.sweep or ("tiny_cpu" if args.cpu_smoke else "gemma")
        trials = args.trials or (2 if args.cpu_smoke else 8)
        results["sweep"] = sweep_times(out, sweep, trials, n, args.per_gpu, args.cpu_smoke, extra)
    (out / "ddp.json").write_text(json.dumps(results, indent=2))
    (out / "ddp.md").write_text(markdown(results))
    print(markdown(results))
    print(f"written: {out / 'ddp.json'}, {out / 'ddp.md'}")


# --- 1. throughput -------------------------------------------------------------------------------


def throughput(out: Path, base: list[str], n: int, cpu: bool) -> list[dict]:
    batch = int(_value(base, "train.batch_size"))
    if batch % n:
        sys.exit(f"error: train.batch_size={batch} does not split over {n} processes")
    ddp = ["distributed=ddp", f"distributed.nproc={n}"]
    runs = [
        ("single", 1, batch, []),
        ("ddp, same global batch", n, batch // n, ddp),
        ("ddp, same batch per process", n, batch, ddp),
    ]
    rows = []
    for label, procs, per_device, extra in runs:
        name = label.split(",")[0] + ("" if procs == 1 else f"-{per_device}")
        folder = out / "runs" / name
        cmd = [*base, *extra, f"train.batch_size={per_device}"]
        seconds = _run([*cmd, f"hydra.run.dir={folder}", _mlflow(out)], out / f"{name}.log")
        m = _metrics(folder)
        grad_accum = int(_value(base, "train.grad_accum", "1"))
        rows.append(
            {
                "run": label,
                "processes": procs,
                "batch_per_process": per_device,
                "global_batch": procs * per_device * grad_accum,
                "tokens_per_second": m.get("final_train_tokens_per_second"),
                "train_seconds": m.get("final_train_seconds"),
                "train_loss": m.get("final_train_loss_avg"),
                "eval_loss": m.get("final_eval_loss"),
                "wall_seconds": seconds,
            }
        )
    first = rows[0]["tokens_per_second"] or float("nan")
    for row in rows:
        row["speedup"] = (row["tokens_per_second"] or float("nan")) / first
    return rows


# --- 2. sweep wall time --------------------------------------------------------------------------


def sweep_times(
    out: Path, sweep: str, trials: int, n: int, per_gpu: int, cpu: bool, overrides: list[str]
) -> dict:
    import optuna

    # On CPU there are no GPUs to pin: n_jobs workers share the cores instead (a smoke test only).
    one = ",".join(["0"] * per_gpu)
    every = ",".join(str(g) for g in range(n) for _ in range(per_gpu))
    if cpu:  # (label, its overrides, trials at once)
        setups = [
            ("1 worker", ["hydra.sweeper.n_jobs=1"], 1),
            (f"{n} workers", [f"hydra.sweeper.n_jobs={n}"], n),
        ]
    else:
        setups = [
            ("1 GPU", [f"hydra.sweeper.gpus=[{one}]"], per_gpu),
            (f"{n} GPUs", [f"hydra.sweeper.gpus=[{every}]"], n * per_gpu),
        ]
    rows = []
    for i, (label, slots, at_once) in enumerate(setups):
        study = f"bench_{sweep}_{i}"
        storage = f"sqlite:///{out}/optuna.db"
        cmd = [
            "--multirun",
            f"sweep={sweep}",
            *SWEEP_FIXED,
            *slots,
            f"hydra.sweeper.n_trials={trials}",
            f"hydra.sweeper.study_name={study}",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweep.dir={out}/sweeps/{study}",
            _mlflow(out),
            *overrides,
        ]
        seconds = _run(cmd, out / f"{study}.log")
        done = optuna.load_study(study_name=study, storage=storage).trials
        states = [t.state.name for t in done]
        rows.append(
            {
                "setup": label,
                "workers": slots[0].split("=", 1)[1],
                "wall_seconds": seconds,
                "complete": states.count("COMPLETE"),
                "failed": states.count("FAIL"),
                # why trials failed (the sweeper keeps each one's error line): a sweep of failed
                # trials times nothing worth comparing
                "errors": sorted(
                    {t.user_attrs.get("error", "?") for t in done if t.state.name == "FAIL"}
                ),
                "slot_busy": slot_busy(done, seconds, at_once),
            }
        )
    for row in rows:
        row["ratio"] = row["wall_seconds"] / rows[0]["wall_seconds"]
    slot = "worker (CPU)" if cpu else "GPU"
    return {"sweep": sweep, "trials": trials, "per_gpu": per_gpu, "slot": slot, "rows": rows}


def slot_busy(trials, wall_seconds: float, slots: int) -> float | None:
    """Share of the sweep's wall time x its slots (GPUs, or CPU workers) that trials ran in: near 1
    when no slot idles while others finish their trials (start-up and the sweeper's own time are
    the rest)."""
    spans = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_start and t.datetime_complete
    ]
    if not spans or wall_seconds <= 0 or slots < 1:
        return None
    return sum(spans) / (wall_seconds * slots)


# --- helpers -------------------------------------------------------------------------------------


def _run(overrides: list[str], log: Path) -> float:
    """`python -m summarizer <overrides>`; its wall time in seconds. A failure stops the benchmark."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    cmd = [sys.executable, "-m", "summarizer", *overrides]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        sys.exit(f"error: exit code {proc.returncode}; see {log}:\n" + "\n".join(tail))
    return seconds


def _mlflow(out: Path) -> str:
    return f"tracking.uri=sqlite:///{out}/mlflow.db"


def _metrics(folder: Path) -> dict[str, float]:
    """The run's training figures (train_metrics.json, the same as MLflow's final_* metrics)."""
    path = folder / "train_metrics.json"
    if not path.exists():
        sys.exit(f"error: {path} missing: the run wrote no training figures")
    return {f"final_{k}": v for k, v in json.loads(path.read_text()).items()}


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """`base` + `extra`, where an `extra` with the same key replaces the base one (Hydra refuses
    two values for one config group, e.g. model=gemma3_270m and model=tiny)."""
    keys = {o.split("=", 1)[0] for o in extra}
    return [o for o in base if o.split("=", 1)[0] not in keys] + extra


def _value(overrides: list[str], key: str, default: str | None = None) -> str:
    """The last `key=value` among the overrides (later ones win, as on Hydra's command line)."""
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    if not values and default is None:
        sys.exit(f"error: no {key}= among the run's overrides")
    return values[-1] if values else default


def _f(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(r: dict) -> str:
    lines = [f"## Multi-GPU: DDP and one trial per GPU ({r['device']}, {r['date']})", ""]
    if r.get("overrides"):
        lines += [f"Extra overrides: `{' '.join(r['overrides'])}`", ""]
    if "throughput" in r:
        lines += [
            "| run | processes | batch per process | global batch | tokens/s | speed-up | "
            "train s | train loss | eval loss |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for x in r["throughput"]:
            lines.append(
                f"| {x['run']} | {x['processes']} | {x['batch_per_process']} | {x['global_batch']} "
                f"| {_f(x['tokens_per_second'], '.0f')} | {_f(x['speedup'], '.2f')}x "
                f"| {_f(x['train_seconds'], '.1f')} | {_f(x['train_loss'], '.4f')} "
                f"| {_f(x['eval_loss'], '.4f')} |"
            )
        lines.append("")
    if "sweep" in r:
        s = r["sweep"]
        lines += [
            f"Sweep `sweep={s['sweep']}`, {s['trials']} trials (random sampler seed 42, no "
            f"pruning), {s['per_gpu']} at a time per {s.get('slot', 'GPU')}:",
            "",
            "| setup | workers | wall time (s) | complete / failed | slots busy | ratio |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for x in s["rows"]:
            lines.append(
                f"| {x['setup']} | `{x['workers']}` | {x['wall_seconds']:.1f} "
                f"| {x['complete']} / {x['failed']} | {_f(x.get('slot_busy'), '.2f')} "
                f"| {x['ratio']:.2f} |"
            )
        lines.append("")
        errors = sorted({e for x in s["rows"] for e in x.get("errors", [])})
        if errors:
            lines += ["**Trials failed, so these wall times compare nothing.** Why:", ""]
            lines += [f"- `{e}`" for e in errors] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
