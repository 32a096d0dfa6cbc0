"""MLflow: one run per job with the resolved config as params, ROUGE and losses as metrics, and the
adapter, predictions and config as artifacts. A failed job's run ends FAILED; nothing is deleted."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

from summarizer.config import TrackingConfig
from summarizer.errors import UserError, first_line
from summarizer.files import write_atomic

log = logging.getLogger(__name__)


def resolve_uri(uri: str, base_dir: str | Path) -> str:
    """Make relative sqlite/file URIs absolute against `base_dir` (the folder the job started in)."""
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme):
            path = uri[len(scheme) :]
            if path and not os.path.isabs(path):
                return scheme + str(Path(base_dir, path).resolve())
    if "://" not in uri and not uri.startswith("file:"):  # a bare folder: MLflow's file store
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return "file:" + str(Path(base_dir, uri).resolve())
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = redact(str(value))[:6000]  # MLflow's limit for a param value
    return flat


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|CREDENTIAL|AUTH", re.IGNORECASE)


@functools.cache
def _secrets() -> tuple[str, ...]:
    """Values never to log: those of variables named like a key, token or password, in the
    environment or in `.env` of the launch folder (8 characters or more: no short word is masked)."""
    from dotenv import dotenv_values

    sources = (os.environ, dotenv_values(Path.cwd() / ".env", interpolate=False))
    values = {v.strip() for src in sources for k, v in src.items() if v and _SECRET_NAME.search(k)}
    return tuple(sorted((v for v in values if len(v) >= 8), key=len, reverse=True))


# The password of a URL (postgresql+psycopg://user:password@host/db): a sweep passes its storage URL
# to every trial, whose config becomes MLflow params.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@/\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every secret value (see `_secrets`) and URL password replaced by ***."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return _URL_PASSWORD.sub(r"\1***@", text)


def redact_files(folder: Path) -> None:
    """Rewrite the YAML files in `folder` with every secret masked. Hydra records a job's command
    and config in .hydra/ as typed, before the job runs: a password in tracking.uri (or a key
    passed on the command line) would stay there in plain text."""
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        text = path.read_text(encoding="utf-8")
        masked = redact(text)
        if masked != text:
            write_atomic(path, masked)


class RedactSecrets(logging.Filter):
    """On a log handler: no secret value reaches the console or the job's log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(f in message for f in self.fragments)


def quiet_third_party() -> None:
    """Drop the start-up lines a user cannot act on; every other warning stays. Called first by
    the commands, before the libraries are imported."""
    import warnings

    # bitsandbytes asks for an optional kernel package at import, even with quant=none
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("kernels-community"))
    # transformers checks checkpoint mtimes and falls back to step numbers, which is what we want
    logging.getLogger("transformers.trainer_utils").addFilter(_DropMessages("mtime may not be"))
    # deprecations raised by the libraries' own calls inside the tested versions, not by settings
    warnings.filterwarnings(
        "ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning
    )
    # Optuna marks features as experimental (heartbeats, retries) that the sweeps rely on on purpose
    warnings.filterwarnings("ignore", message=r".* is experimental \(supported from v")


def preflight(cfg: TrackingConfig, uri: str) -> None:
    """Fail before training, not after it, when the tracking store cannot be used."""
    if not cfg.enabled:
        return
    import mlflow

    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"tracking.uri={uri}: folder {folder} is not writable")
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    # Remote servers: fail in seconds instead of MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    try:
        use_experiment(uri, cfg.experiment)
    except Exception as e:  # MLflow raises many types for an unusable store
        first = first_line(e)
        raise UserError(f"tracking.uri={uri}: MLflow store not usable ({first[:300]})") from e


# MLflow's UI opens an experiment by its kind: without this tag it guesses GenAI (traces) for a new
# one; model training opens on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A view of the runs table kept in the experiment (MLflow's "share view" tags): the URL
# ...?viewStateShareKey=VIEW_KEY opens it with these columns.
VIEW_KEY = "summarizer"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
HEADLINE = ("model", "data", "lora.r", "lora.alpha", "train.lr", "prompt.fewshot.k", "selection")
HEADLINE += ("augmentation",)
COLUMNS = [f"params.`{k}`" for k in HEADLINE] + [
    f"metrics.`{k}`" for k in ("rouge1", "rouge2", "rougeL", "rouge_sum", "eval_loss")
]


def use_experiment(uri: str, name: str):
    """The experiment `name` (created if new), tagged as model training with the runs view."""
    import mlflow
    from mlflow.tracking import MlflowClient

    exp = mlflow.set_experiment(name)
    missing = {k: v for k, v in EXPERIMENT_KIND.items() if exp.tags.get(k) != v}
    if VIEW_TAG not in exp.tags:
        missing[VIEW_TAG] = json.dumps({"selectedColumns": COLUMNS})
    client = MlflowClient(uri)
    for k, v in missing.items():
        client.set_experiment_tag(exp.experiment_id, k, v)
    return exp


def sweep_view(uri: str, experiment_id: str, study: str) -> str:
    """A shared runs view of one sweep: its parent and every trial, flat (MLflow nests children
    only when sorted by start time, and a shared view cannot expand a parent), best ROUGE first,
    with the headline columns. Returns its share key."""
    from mlflow.tracking import MlflowClient

    key = f"sweep-{study}"
    study_sql = study.replace("'", "''")
    view = {
        "selectedColumns": COLUMNS,
        "searchFilter": f"attributes.run_name LIKE '%{study_sql}%'",
        "orderByKey": "metrics.`rouge_sum`",  # sorted by anything but start time: flat, best first
        "orderByAsc": False,
    }
    MlflowClient(uri).set_experiment_tag(
        experiment_id, VIEW_TAG[: -len(VIEW_KEY)] + key, json.dumps(view)
    )
    return key


def runs_url(uri: str, experiment: str, server: str) -> str:
    """The address of `experiment`'s runs table with the shared view, on the UI at `server`."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = use_experiment(uri, experiment)
    return (
        f"{server.rstrip('/')}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
    )


def headline(params: dict) -> dict[str, str]:
    """The settings a reader compares runs by, under short names (the full config is there too)."""
    flat = flatten(params)
    aug = params.get("augmentation") or {}
    on = [k for k, v in aug.items() if isinstance(v, dict) and v.get("enabled")]
    out = {
        "model": flat.get("model.name"),
        "data": flat.get("data.name"),
        "lora.r": flat.get("lora.r"),
        "lora.alpha": flat.get("lora.alpha"),
        "train.lr": flat.get("train.lr"),
        "prompt.fewshot.k": flat.get("prompt.fewshot.k"),
        "selection": flat.get("prompt.fewshot.selection"),
        "augmentation": "+".join(sorted(on)) or "none",
    }
    return {k: v for k, v in out.items() if v is not None}


def describe(params: dict, tags: dict) -> str:
    """One line for the run's description (`mlflow.note.content`)."""
    h = headline(params)
    text = (
        f"{h.get('model', '?')} on {h.get('data', '?')}: LoRA r={h.get('lora.r', '?')} "
        f"alpha={h.get('lora.alpha', '?')}, lr={h.get('train.lr', '?')}, "
        f"{h.get('prompt.fewshot.k', '0')}-shot ({h.get('selection', 'fixed')}), "
        f"augmentation: {h.get('augmentation', 'none')}."
    )
    if "optuna.trial" in tags:
        text += f" Sweep {tags.get('optuna.study')} trial {tags['optuna.trial']}."
    if "output_dir" in tags:
        text += f" Output folder: {tags['output_dir']}"
    return text


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """A TCP connect to the server (unless a proxy is in the way): refused or silent in seconds."""
    url = urlparse(uri)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if url.scheme in getproxies() and not proxy_bypass(host):
        return  # only the proxy can tell; MLflow's own (shortened) retries decide
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(
            f"tracking.uri={uri}: MLflow server not reachable ({reason}); start it, or log to a "
            "local store: tracking.uri=sqlite:///mlflow.db (or tracking.enabled=false)"
        ) from e


@contextlib.contextmanager
def run(
    cfg: TrackingConfig,
    uri: str,
    run_name: str,
    params: dict,
    tags: dict,
    parent_run_id: str | None = None,
    killed_by: tuple[type[BaseException], ...] = (),
    resume_run_id: str | None = None,
) -> Iterator:
    """An MLflow run for the job, ended FAILED when the body raises, KILLED on Ctrl-C or on one of
    `killed_by` (a pruned sweep trial). `parent_run_id` nests it under a sweep's run, across
    processes. Tag `state` says COMPLETE, PRUNED or FAIL, as Optuna would. `resume_run_id`
    continues that run (train.resume): params it already has are kept, missing ones added."""
    if not cfg.enabled:
        yield None
        return
    import mlflow

    preflight(cfg, uri)
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    tags = {"mlflow.note.content": describe(params, tags), **tags, "state": "RUNNING"}
    tags = {k: redact(str(v)) for k, v in tags.items()}
    logged: dict[str, str] = {}
    if resume_run_id:
        logged = _existing_params(resume_run_id, uri)
        start = {"run_id": resume_run_id}
    else:
        start = {"run_name": redact(run_name)}
    with mlflow.start_run(**start, tags=tags) as active:
        try:
            every = {**flatten(params), **headline(params)}
            items = [(k, v) for k, v in every.items() if k not in logged]
            for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per call
                mlflow.log_params(dict(items[i : i + 100]))
            yield active
            mlflow.set_tag("state", "COMPLETE")
        except (KeyboardInterrupt, *killed_by) as e:
            mlflow.set_tag("state", "FAIL" if isinstance(e, KeyboardInterrupt) else "PRUNED")
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            mlflow.set_tag("state", "FAIL")
            mlflow.end_run(status="FAILED")
            raise


def _existing_params(run_id: str, uri: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        raise UserError(
            f"train.resume=true: MLflow run {run_id} (the folder's mlflow_run_id) is not in "
            f"tracking.uri={uri}; resume with the run's own tracking.uri"
        ) from e
    if run.info.lifecycle_stage == "deleted":
        raise UserError(f"train.resume=true: MLflow run {run_id} was deleted; restore it first")
    return dict(run.data.params)


def _active_mlflow():
    """mlflow, when a run is active (it is imported only by runs with tracking enabled)."""
    mlflow = sys.modules.get("mlflow")
    return mlflow if mlflow is not None and mlflow.active_run() else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if mlflow := _active_mlflow():
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    if mlflow := _active_mlflow():
        mlflow.set_tags({k: redact(str(v)) for k, v in tags.items()})


def log_new_params(uri: str, run_id: str, params: dict[str, str]) -> None:
    """Params a run does not have yet (params cannot change: a resumed sweep keeps its first)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    have = client.get_run(run_id).data.params
    new = [Param(k, redact(str(v))[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i : i + 100])


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow = _active_mlflow()
    if mlflow is None or not path.exists():
        return
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def parent_run(
    uri: str,
    experiment: str,
    study: str,
    storage: str,
    study_id: str | None = None,
    adopt: bool = False,
) -> str:
    """The MLflow run of a sweep: the existing one of this study (a resumed sweep, another worker),
    else a new one. With `study_id` (the study's own UUID) the run is found by it, so a new study
    under an old name (storage deleted, another storage) gets its own run. `adopt`: a study that
    was just given its identity (made before identities) takes over the parent of its name and
    storage that has none yet. Without `study_id`: found by name, as for such an older study."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    exp = use_experiment(uri, experiment)
    client = MlflowClient(uri)
    by_name = f"tags.`sweep.study` = '{study}' and tags.`sweep.role` = 'parent'"
    key = f" and tags.`sweep.study_id` = '{study_id}'" if study_id else ""
    found = client.search_runs([exp.experiment_id], filter_string=by_name + key, max_results=1)
    if not found and study_id and adopt:
        found = [
            r
            for r in client.search_runs([exp.experiment_id], filter_string=by_name)
            if "sweep.study_id" not in r.data.tags and r.data.tags.get("sweep.storage") == storage
        ][:1]
        if found:
            client.set_tag(found[0].info.run_id, "sweep.study_id", study_id)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {"sweep.study": study, "sweep.role": "parent", "sweep.storage": storage}
    if study_id:
        tags["sweep.study_id"] = study_id
    key = sweep_view(uri, exp.experiment_id, study)
    tags["sweep.view"] = f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey={key}"
    run = client.create_run(exp.experiment_id, run_name=f"sweep-{study}", tags=tags)
    return run.info.run_id


def end_trial_runs(uri: str, parent_run_id: str, number: int, status: str, state: str) -> int:
    """End the still-RUNNING runs of sweep trial `number` under `parent_run_id` (its job died
    with its worker, or was cut off); found by tags, from any machine. Returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`optuna.trial` = '{number}' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    for r in found:
        client.set_tag(r.info.run_id, "state", state)
        client.set_terminated(r.info.run_id, status=status)
    return len(found)


def end_run_if_running(uri: str, run_id: str, status: str, state: str) -> None:
    """Close a trial's run whose process died before it could (SIGKILL, OOM killer)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "state", state)
        client.set_terminated(run_id, status=status)


def main(argv: list[str] | None = None) -> int:
    """`python -m summarizer.tracking URI EXPERIMENT SERVER`: print the runs view's address."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m summarizer.tracking", description=main.__doc__)
    p.add_argument("uri")
    p.add_argument("experiment")
    p.add_argument("server")
    args = p.parse_args(argv)
    print(runs_url(resolve_uri(args.uri, Path.cwd()), args.experiment, args.server))
    return 0


if __name__ == "__main__":
    sys.exit(main())
