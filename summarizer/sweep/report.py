"""Sweep report: best-trial summary and one page of the trials and Optuna's plots (report.html),
written to a folder and to the sweep's parent MLflow run. Runs at the end of every sweep; `make sweep-report SWEEP=<name>` regenerates it.

    python -m summarizer.sweep.report <study> [--storage sqlite:///multirun/optuna.db] [--out DIR]
        [--tracking-uri sqlite:///mlflow.db]

Everything comes from the shared stores — the study (trials, best trial, its metrics and adapter
path) and the MLflow server — so any machine of a multi-machine sweep can make it:

    python -m summarizer.sweep.report tiny_cpu --storage $SWEEP_STORAGE --tracking-uri $TRACKING_URI
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from summarizer.config import TrackingConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic
from summarizer.sweep.storage import check_storage, resolve_storage, shown
from summarizer.sweep.study import (
    PRUNED_AT,
    REFIT,
    ROW_SCORES,
    STUDY_ID,
    WORKER,
    retry_of,
    tally,
)
from summarizer.tracking import parent_run, preflight, resolve_uri

log = logging.getLogger(__name__)

# Optuna's own plots; the ones a study cannot have yet (too few finished trials) are skipped.
PLOTS = {
    "optimization_history": optuna.visualization.plot_optimization_history,
    "param_importances": optuna.visualization.plot_param_importances,
    "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
    "slice": optuna.visualization.plot_slice,
    "intermediate_values": optuna.visualization.plot_intermediate_values,
}


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def paired_bootstrap(
    best: list[float],
    other: list[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    maximize: bool = True,
) -> dict:
    """Best minus runner-up on the same rows, resampled: the rows are drawn with replacement
    `resamples` times (seeded) and each draw's mean difference kept. Returns the observed mean
    difference, the 2.5 and 97.5 percentiles of the draws (a 95 % interval), and the share of draws
    in which `best` is ahead (above for maximize, below otherwise)."""
    a, b = np.asarray(best, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired rows needed: {a.shape} vs {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 4_000_000 // len(diff))  # draws per chunk: bounded memory for large splits
    for start in range(0, resamples, step):
        n = min(step, resamples - start)
        means[start : start + n] = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    ahead = means > 0 if maximize else means < 0
    return {
        "mean_diff": float(diff.mean()),
        "low": float(low),
        "high": float(high),
        "share_ahead": float(ahead.mean()),
        "resamples": resamples,
        "seed": seed,
    }


def compare_best(study: optuna.Study) -> dict:
    """The paired bootstrap of the best COMPLETE trial against the runner-up on their validation
    rows, or `note` saying why there is none (one trial, no row scores, other rows)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    out: dict = {"validation_rows": None}
    if not trials:
        return {**out, "note": "no COMPLETE trial"}
    best = study.best_trial  # the one the report and the refit name, also among equal values
    others = [t for t in trials if t.number != best.number]
    ranked = [best, *sorted(others, key=lambda t: t.value, reverse=maximize)]
    rows = best.user_attrs.get(ROW_SCORES)
    if rows:
        out["validation_rows"] = len(rows["values"])
        out["key"] = rows["key"]
    if len(ranked) < 2:
        return {**out, "best": best.number, "note": "no runner-up: one COMPLETE trial"}
    runner = ranked[1]
    out.update({"best": best.number, "runner_up": runner.number})
    other = runner.user_attrs.get(ROW_SCORES)
    missing = [t.number for t, r in ((best, rows), (runner, other)) if not r]
    if missing:
        which = " and ".join(f"trial {n}" for n in missing)
        return {**out, "note": f"{which} kept no per-row scores: no paired comparison"}
    if rows["ids_hash"] != other["ids_hash"] or rows["key"] != other["key"]:
        return {
            **out,
            "note": f"trials {best.number} and {runner.number} were scored on different "
            "validation rows (or objectives): no paired comparison",
        }
    out["bootstrap"] = paired_bootstrap(rows["values"], other["values"], maximize=maximize)
    return out


def summary(study: optuna.Study) -> dict:
    """Trials by state, `done` as the sweeper counts it (a failed trial that was run again is not
    done: its retry is), the best trial with its metrics, and every trial with `retry_of`."""
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    out = {
        "study": study.study_name,
        "study_id": study.user_attrs.get(STUDY_ID),
        "direction": study.direction.name,
        "trials": states,
        "done": tally(study)[0],
        "best": None,
        "comparison": compare_best(study),
        "refit": study.user_attrs.get(REFIT),
    }
    if done:
        best = study.best_trial
        attrs = best.user_attrs
        if "metrics" in attrs:  # kept in the study by the sweeper: readable from any machine
            result = {"metrics": attrs["metrics"], "adapter": attrs.get("adapter")}
        else:  # a study from before that: the trial's folder, where it still is
            result_file = Path(attrs.get("output_dir", "")) / "result.json"
            result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        out["best"] = {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "overrides": attrs.get("overrides"),
            "worker": attrs.get(WORKER),  # host:pid: the adapter is on that host
            "output_dir": attrs.get("output_dir"),
            "adapter": result.get("adapter"),
            "metrics": result.get("metrics", {}),
        }
    out["all"] = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "pruned_at": t.user_attrs.get(PRUNED_AT),  # the mean it had when pruned
            "params": t.params,
            "worker": t.user_attrs.get(WORKER),
            "retry_of": retry_of(t),
        }
        for t in trials
    ]
    return out


def _owner(folder: Path) -> tuple | None:
    """(study, study_id) of the report in `folder`, None where there is none."""
    try:
        info = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        return info.get("study"), info.get("study_id")
    except (OSError, ValueError, AttributeError):
        return None


def report_dir(out_dir: Path, study: optuna.Study) -> Path:
    """`out_dir`, unless it holds another study's report (another study name, or a new study under
    the old name, in the same sweep folder): then `<out_dir>-<study>` beside it (with the study's
    id where that is taken too). A report never replaces another study's."""
    me = (study.study_name, study.user_attrs.get(STUDY_ID))
    tries = [out_dir, out_dir.with_name(f"{out_dir.name}-{me[0]}")]
    if me[1]:
        tries.append(out_dir.with_name(f"{out_dir.name}-{me[0]}-{me[1][:8]}"))
    for folder in tries:
        if _owner(folder) in (None, me):
            return folder
    return out_dir.with_name(f"{out_dir.name}-{me[0]}-{time.strftime('%Y%m%d-%H%M%S')}")


def report(
    study: optuna.Study,
    out_dir: Path,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    status: str | None = "FINISHED",
    ui: str = "http://127.0.0.1:5000",
) -> dict:
    """Write the summary and the report page to `out_dir` and to the parent run, then end that run
    with `status` (None: leave it running, as while other workers still run trials). `ui`: the
    MLflow UI's address the page links the trials' runs to (`make mlflow-ui`'s by default)."""
    out_dir = report_dir(out_dir, study)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = summary(study)
    write_atomic(out_dir / "summary.json", json.dumps(info, indent=2, ensure_ascii=False))
    n_complete = info["trials"].get("COMPLETE", 0)
    figures = []
    for name, plot in PLOTS.items():
        if n_complete < (2 if name == "param_importances" else 1):
            continue  # importances need two finished trials
        try:
            figures.append((name, plot(study)))
        except (ValueError, RuntimeError) as e:  # e.g. a single-valued parameter
            log.info("plot %s skipped: %s", name, e)
    links = {}
    if tracking_uri and parent_run_id:
        from mlflow.tracking import MlflowClient

        children = _children(MlflowClient(tracking_uri), parent_run_id)
        links = {n: f"{ui.rstrip('/')}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}"
                 for n, r in children.items()}  # fmt: skip
    write_atomic(out_dir / "report.html", page(info, figures, links))
    if tracking_uri and parent_run_id:
        _to_mlflow(tracking_uri, parent_run_id, info, out_dir, status)
    log.info("sweep report: %s (summary.json, report.html: %d plots)", out_dir, len(figures))
    return info


def page(info: dict, figures: list, links: dict[str, str]) -> str:
    """One self-contained page: the trials (each linked to its MLflow run) and Optuna's plots, with
    plotly.js inlined once, so that it renders offline and as an MLflow artifact."""
    e = html.escape
    rows = []
    for t in info["all"]:
        number = str(t["number"])
        run = f'<a href="{e(links[number])}">run</a>' if number in links else ""
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        if t.get("pruned_at"):  # not Optuna's value: under per-row reports one row's score
            p = t["pruned_at"]
            value = f"{p['value']:.4f} ({e(p['name'])} at step {p['step']})"
        params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        rows.append(
            f"<tr><td>{number}</td><td>{t['state']}</td><td>{value}</td><td>{e(params)}</td>"
            f"<td>{run}</td></tr>"
        )
    best = info["best"]
    head = f"best: trial {best['number']} ({best['value']:.4f})" if best else "no finished trial"
    noise = f"<p>{e(comparison_line(info['comparison']))}</p>"
    refit = info.get("refit")
    if refit:
        noise += f"<p>refit of trial {refit.get('trial')}: {e(str(refit.get('state')))} "
        noise += f"({e(str(refit.get('output_dir')))})</p>"
    plots = [
        f"<h2>{e(name.replace('_', ' '))}</h2>"
        + fig.to_html(full_html=False, include_plotlyjs=i == 0)
        for i, (name, fig) in enumerate(figures)
    ]
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>sweep {e(info['study'])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}"
        "</style></head><body>"
        f"<h1>Sweep {e(info['study'])}</h1><p>{e(head)}; {info['done']} trial(s) done "
        f"({e(', '.join(f'{k.lower()} {v}' for k, v in info['trials'].items() if v))})</p>"
        + noise
        + "<table><tr><th>trial</th><th>state</th><th>value</th><th>params</th><th>MLflow</th></tr>"
        + "".join(rows)
        + "</table>"
        + "".join(plots)
        + "</body></html>\n"
    )


def comparison_line(c: dict) -> str:
    """The comparison in one sentence: the report page, the parent run's description."""
    n = c.get("validation_rows")
    size = f"validation rows: {n}" if n else "validation rows: unknown"
    boot = c.get("bootstrap")
    if not boot:
        return f"{size}; {c.get('note', 'no comparison')}."
    return (
        f"{size}; trial {c['best']} minus runner-up trial {c['runner_up']} ({c['key']}, paired "
        f"bootstrap of {boot['resamples']} resamples of rows): {boot['mean_diff']:+.3f}, 95 % "
        f"interval [{boot['low']:+.3f}, {boot['high']:+.3f}]; the best is ahead in "
        f"{100 * boot['share_ahead']:.1f} % of the resamples."
    )


def _to_mlflow(uri: str, run_id: str, info: dict, out_dir: Path, status: str | None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for state, n in info["trials"].items():
        client.log_metric(run_id, f"trials_{state.lower()}", n)
    client.log_metric(run_id, "trials_done", info["done"])
    best = info["best"]
    children = _children(client, run_id)
    if best:
        child = children.get(str(best["number"]))
        # The best trial's own run has every figure (ROUGE, eval loss, speed); the study keeps
        # only ROUGE, which is what a run without MLflow (or on another server) leaves.
        figures = {**best["metrics"], **(child.data.metrics if child else {})}
        client.log_metric(run_id, "best_value", best["value"])
        for k, v in figures.items():
            client.log_metric(run_id, f"best_{k}", v)
        client.set_tag(run_id, "best.trial", str(best["number"]))
        client.set_tag(run_id, "best.overrides", best["overrides"] or "")
        client.set_tag(run_id, "best.adapter", best["adapter"] or "")
        for number, r in children.items():
            is_best = number == str(best["number"])
            if is_best or r.data.tags.get(BEST_TAG) == "true":
                client.set_tag(r.info.run_id, BEST_TAG, str(is_best).lower())
        if child:
            client.set_tag(run_id, "best.run_id", child.info.run_id)
        _log_best_adapter(client, run_id, best)
    comparison = info["comparison"]
    if comparison.get("validation_rows"):
        client.log_metric(run_id, "validation_rows", comparison["validation_rows"])
    if boot := comparison.get("bootstrap"):
        for k in ("mean_diff", "low", "high", "share_ahead"):
            client.log_metric(run_id, f"best_vs_runner_up_{k}", boot[k])
    note = _description(info, out_dir) + " " + comparison_line(comparison)
    if view := client.get_run(run_id).data.tags.get("sweep.view"):
        note += f" All its runs, flat: the MLflow UI's {view}"
    client.set_tag(run_id, "mlflow.note.content", note)
    client.log_artifacts(run_id, str(out_dir), artifact_path="report")
    if status:
        client.set_terminated(run_id, status=status)


BEST_TAG = "sweep.best"  # "true" on the best trial's run, "false" on one that no longer is


def _children(client, run_id: str) -> dict[str, object]:
    """The trials' runs under the parent, by trial number (the latest run of a number)."""
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    return {r.data.tags["optuna.trial"]: r for r in found if "optuna.trial" in r.data.tags}


def _log_best_adapter(client, run_id: str, best: dict) -> None:
    """The best trial's adapter as the parent's `best_adapter/` artifact, once per best trial;
    only where its folder is on this machine (a multi-machine sweep: the host in best.worker)."""
    folder = Path(best["adapter"] or "")
    if not best["adapter"] or not folder.is_dir():
        return
    tags = client.get_run(run_id).data.tags
    if tags.get("best.adapter_logged") == str(best["number"]):
        return
    client.log_artifacts(run_id, str(folder), artifact_path="best_adapter")
    client.set_tag(run_id, "best.adapter_logged", str(best["number"]))


def _description(info: dict, out_dir: Path) -> str:
    t = info["trials"]
    text = (
        f"Optuna sweep {info['study']} ({info['direction'].lower()}): {info['done']} trial(s) "
        f"done: {t.get('COMPLETE', 0)} complete, {t.get('PRUNED', 0)} pruned, "
        f"{t.get('FAIL', 0)} failed."
    )
    best = info["best"]
    if best:
        text += f" Best: trial {best['number']} ({best['value']:.4f}): {best['overrides']}."
    return text + f" Report: {out_dir / 'report.html'} (artifacts: report/report.html)."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m summarizer.sweep.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("study", help="the sweep's study name (its sweep config's name)")
    p.add_argument("--storage", default="sqlite:///multirun/optuna.db")
    p.add_argument("--out", type=Path, default=None, help="default: multirun/<study>/report")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="summarizer")
    p.add_argument("--mlflow-ui", default="http://127.0.0.1:5000", help="linked from the page")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = resolve_storage(args.storage, Path.cwd())
    uri = resolve_uri(args.tracking_uri, Path.cwd())
    try:
        check_storage(url)
        study = optuna.load_study(study_name=args.study, storage=url)
        preflight(TrackingConfig(uri=uri, experiment=args.experiment), uri)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(url)]
        print(f"error: no study {args.study!r} in {shown(url)} (studies: {names})", file=sys.stderr)
        return 2
    parent = parent_run(
        uri, args.experiment, args.study, shown(url), study.user_attrs.get(STUDY_ID)
    )
    done, running, _ = tally(study)
    # A sweep still running (other workers) keeps its parent run open; its last worker ends it.
    status = None if running else ("FINISHED" if done else "KILLED")
    info = report(
        study,
        args.out or Path("multirun") / args.study / "report",
        uri,
        parent,
        status=status,
        ui=args.mlflow_ui,
    )
    best = info["best"]
    print(json.dumps(best, indent=2, ensure_ascii=False) if best else "no finished trial yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
