"""Sweep report: best-trial summary and Optuna's plots, written to a folder and to the sweep's
parent MLflow run. Runs at the end of every sweep; `make sweep-report SWEEP=<name>` regenerates it.

    python -m summarizer.sweep.report <study> [--storage sqlite:///multirun/optuna.db] [--out DIR]
        [--tracking-uri sqlite:///mlflow.db]

Everything comes from the shared stores — the study (trials, best trial, its metrics and adapter
path) and the MLflow server — so any machine of a multi-machine sweep can make it:

    python -m summarizer.sweep.report tiny_cpu --storage $SWEEP_STORAGE --tracking-uri $TRACKING_URI
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from summarizer.config import TrackingConfig
from summarizer.errors import UserError
from summarizer.files import write_atomic
from summarizer.sweep.storage import check_storage, resolve_storage, shown
from summarizer.sweep.study import STUDY_ID, WORKER, retry_of, tally
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
) -> dict:
    """Write the summary and plots to `out_dir` and to the parent run, then end that run with
    `status` (None: leave it running, as while other workers still run trials)."""
    out_dir = report_dir(out_dir, study)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = summary(study)
    write_atomic(out_dir / "summary.json", json.dumps(info, indent=2, ensure_ascii=False))
    n_complete = info["trials"].get("COMPLETE", 0)
    written = ["summary.json"]
    for name, plot in PLOTS.items():
        if n_complete < (2 if name == "param_importances" else 1):
            continue  # importances need two finished trials
        try:
            fig = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. a single-valued parameter
            log.info("plot %s skipped: %s", name, e)
            continue
        # Small files: plotly.js comes from its CDN when the page is opened.
        write_atomic(out_dir / f"{name}.html", fig.to_html(include_plotlyjs="cdn", full_html=True))
        written.append(f"{name}.html")
    if tracking_uri and parent_run_id:
        _to_mlflow(tracking_uri, parent_run_id, info, out_dir, status)
    log.info("sweep report: %s (%s)", out_dir, ", ".join(written))
    return info


def _to_mlflow(uri: str, run_id: str, info: dict, out_dir: Path, status: str | None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for state, n in info["trials"].items():
        client.log_metric(run_id, f"trials_{state.lower()}", n)
    client.log_metric(run_id, "trials_done", info["done"])
    best = info["best"]
    if best:
        client.log_metric(run_id, "best_value", best["value"])
        for k, v in best["metrics"].items():
            client.log_metric(run_id, f"best_{k}", v)
        client.set_tag(run_id, "best.trial", str(best["number"]))
        client.set_tag(run_id, "best.overrides", best["overrides"] or "")
        client.set_tag(run_id, "best.adapter", best["adapter"] or "")
    client.log_artifacts(run_id, str(out_dir), artifact_path="report")
    if status:
        client.set_terminated(run_id, status=status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m summarizer.sweep.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("study", help="the sweep's study name (its sweep config's name)")
    p.add_argument("--storage", default="sqlite:///multirun/optuna.db")
    p.add_argument("--out", type=Path, default=None, help="default: multirun/<study>/report")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="summarizer")
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
        study, args.out or Path("multirun") / args.study / "report", uri, parent, status=status
    )
    best = info["best"]
    print(json.dumps(best, indent=2, ensure_ascii=False) if best else "no finished trial yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
