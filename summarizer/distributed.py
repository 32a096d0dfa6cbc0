"""DDP: one run trained by one process per GPU (`trainer=ddp`).

`python -m summarizer trainer=ddp ...` composes the config as usual, then `pipeline.run` hands it to
`launch`, which starts `nproc` workers (`python -m summarizer.distributed`, the resolved config on
stdin) with the torch.distributed environment set (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)
and waits for them. Each worker runs the ordinary pipeline: every rank loads the data and the model
(on GPU LOCAL_RANK) and trains its share of each batch — HF's Trainer wraps the model in DDP when
WORLD_SIZE is set — and rank 0 alone writes the run's files, logs to MLflow, reports to Optuna,
saves the adapter, generates and scores. The launcher then returns rank 0's objective from
result.json, so a sweep trial with trainer=ddp looks like any other job.

Why our own launcher rather than torchrun: each rank's output goes to `<run>/ddp/rank<N>.log`
(rank 0's also to the console), a failed rank stops the others at once and becomes one `error:` line
naming its log (a UserError in a worker surfaces as the same line a one-process run prints), and a
run killed by a dead rank still gets its MLflow run closed. Running the pipeline under an external
launcher also works (`torchrun --nproc_per_node 2 -m summarizer hydra.run.dir=<one folder> ...`):
the same rank gating applies, `setup` checks that every rank got the same folder.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from summarizer.errors import UserError, log_tail

log = logging.getLogger(__name__)

FOLDER = "ddp"  # in the run folder: one log per rank
TAGS_ENV = "SUMMARIZER_DDP_TAGS"  # the launching job's Hydra choices (MLflow tags) for rank 0
# Rank 0 may convert a GGUF file or download a hub model while the others wait at a barrier;
# HF's own default (ddp_timeout) is the same 30 minutes.
TIMEOUT = datetime.timedelta(minutes=30)


# --- where this process stands -------------------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_worker() -> bool:
    """Started by a distributed launcher (ours, torchrun, accelerate launch): never relaunch."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


# --- what the config asks for --------------------------------------------------------------------


def resolve_nproc(nproc: int | str, gpus: int | None = None) -> int:
    """Processes for `trainer.nproc`: auto = every visible GPU; a number is checked against them."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if str(nproc) == "auto":
        if gpus == 0:
            raise UserError(
                "trainer.nproc=auto counts CUDA GPUs and none is visible; on CPU set trainer.nproc=N "
                "(N gloo processes) or use trainer=single"
            )
        return gpus
    try:
        n = int(nproc)
    except ValueError:
        raise UserError(f"trainer.nproc={nproc!r}: expected auto or a number >= 1") from None
    if n < 1:
        raise UserError(f"trainer.nproc={n}: expected auto or a number >= 1")
    if gpus and n > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"trainer.nproc={n} but {gpus} GPU(s) are visible"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: DDP runs one "
            f"process per GPU; use trainer.nproc=auto or at most {gpus}"
        )
    return n


def resolve_backend(name: str, cuda: bool | None = None) -> str:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name not in ("nccl", "gloo"):
        raise UserError(f"trainer.backend={name!r}: expected auto, nccl or gloo")
    if name == "nccl" and not cuda:
        raise UserError(
            "trainer.backend=nccl needs CUDA GPUs and none is visible; use trainer.backend=auto "
            "(gloo on CPU)"
        )
    return name


def processes(cfg: DictConfig) -> int:
    """How many processes should train this job: 1 runs it here, more go through `launch`.
    A worker (already under a launcher) is always 1: it is one of those processes."""
    if is_worker():
        return 1
    n = resolve_nproc(cfg.trainer.nproc)
    resolve_backend(cfg.trainer.backend)  # a bad backend fails here, not in every worker
    if n > 1 and not cfg.stages.train:
        log.info("trainer.nproc=%d: nothing to train (stages.train=false), one process", n)
        return 1
    return n


# --- inside the workers --------------------------------------------------------------------------


def setup(trainer_cfg, out: Path) -> None:
    """A worker joins the process group (on its own GPU with NCCL) before the run writes anything,
    and checks that every rank writes to the same folder (torchrun without hydra.run.dir would not).
    HF's Trainer (accelerate) reuses this group. Nothing to do outside DDP."""
    if world_size() <= 1 or dist.is_initialized():
        return
    backend = resolve_backend(trainer_cfg.backend)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    folders: list = [None] * world_size()
    dist.all_gather_object(folders, str(out.resolve()))  # also a barrier: all checked `out` first
    if len(set(folders)) > 1:
        raise UserError(
            f"DDP ranks write to different folders ({folders[0]} on rank 0, {folders[1]} on rank 1): "
            "give every rank the same hydra.run.dir=... (or use python -m summarizer trainer=ddp)"
        )


def barrier() -> None:
    if _active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the body first (a GGUF conversion, a hub download: the others then read the
    cache) while the other ranks wait; then they run it. A no-op outside DDP."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def from_main(value):
    """Rank 0's `value` on every rank (a pruning decision: all ranks stop at the same step)."""
    if not _active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: float) -> float:
    """The sum of `value` over the ranks (training tokens: the throughput of the whole job)."""
    if not _active():
        return value
    on_gpu = dist.get_backend() == "nccl"
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def launcher_tags() -> dict[str, str]:
    """MLflow tags of the job that launched this worker (its Hydra choices and overrides)."""
    try:
        return dict(json.loads(os.environ.get(TAGS_ENV, "{}")))
    except ValueError:
        return {}


def sweep_gpus(value) -> list[str]:
    """`hydra.sweeper.gpus` -> the CUDA_VISIBLE_DEVICES of each sweep worker (one trial per GPU).
    `auto`: every GPU this process sees, by the entries of its own CUDA_VISIBLE_DEVICES when set (a
    sweep confined to some GPUs stays on them); a list is taken as given; empty: no pinning."""
    if isinstance(value, str):
        if value != "auto":
            raise UserError(f"hydra.sweeper.gpus={value}: expected auto or a list like [0,1]")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [v.strip() for v in visible.split(",") if v.strip()]
        else:
            gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not gpus:
            raise UserError(
                "hydra.sweeper.gpus=auto: no CUDA GPU is visible; on CPU use hydra.sweeper.n_jobs=N"
            )
        return gpus
    return [str(g) for g in value or []]


# --- the launcher --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(r: int, n: int, port: int, tags: dict, base: dict | None = None) -> dict[str, str]:
    """The environment of worker `r` of `n` (what torchrun --standalone would set, plus ours)."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(r),
        LOCAL_RANK=str(r),
        WORLD_SIZE=str(n),
        LOCAL_WORLD_SIZE=str(n),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1",  # rank 0's progress reaches the console as it happens
        **{TAGS_ENV: json.dumps(tags)},
    )
    # n processes share the cores: without this each starts a thread per core (torchrun sets 1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return env


def worker_command() -> list[str]:
    return [sys.executable, "-m", "summarizer.distributed", "-"]


def launch(cfg: DictConfig, out: Path, nproc: int, tags: dict | None = None) -> float:
    """Train the job in `nproc` worker processes; returns rank 0's objective (result.json)."""
    from summarizer.sweep.trial import read_result

    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    port = cfg.trainer.master_port or free_port()
    backend = resolve_backend(cfg.trainer.backend)
    # On stdin, not in a file: the resolved config may hold values redact() masks in config.yaml.
    text = OmegaConf.to_yaml(cfg, resolve=True).encode()
    logs = [folder / f"rank{r}.log" for r in range(nproc)]
    log.info(
        "trainer=ddp: %d processes (%s, port %d); logs in %s/rank*.log",
        nproc, backend, port, folder,
    )  # fmt: skip
    procs: list[subprocess.Popen] = []
    files = [open(p, "ab") for p in logs]  # appended: a resumed run keeps the earlier attempt's
    tee = None
    try:
        for r in range(nproc):
            procs.append(
                subprocess.Popen(
                    worker_command(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE if r == 0 else files[r],
                    stderr=subprocess.STDOUT,
                    env=worker_env(r, nproc, port, tags or {}),
                )
            )
            with contextlib.suppress(BrokenPipeError):  # died at start-up: wait() reports it
                procs[r].stdin.write(text)
                procs[r].stdin.close()
            if r == 0:
                tee = threading.Thread(target=_tee, args=(procs[0].stdout, files[0]), daemon=True)
                tee.start()
        failed = wait(procs)
    except KeyboardInterrupt:  # the workers got the Ctrl-C too: let them end their MLflow run
        stop(procs, patience=15)
        raise
    except BaseException:  # a worker that could not start: leave no rank behind
        stop(procs)
        raise
    finally:
        if tee is not None:
            tee.join(timeout=30)
        for f in files:
            f.close()
    if failed is not None:
        r, code = failed
        log.error("trainer=ddp: rank %d exited with code %d; the other ranks were stopped", r, code)
        _close_mlflow_run(cfg, out)
        raise UserError(failure_message(r, code, logs[r], nproc))
    result = read_result(out)
    if result is None:
        raise UserError(f"trainer=ddp: the workers left no result.json in {out}; see {logs[0]}")
    value = result.get("value")
    return float(value) if result.get("state") == "COMPLETE" and value is not None else float("nan")


def wait(procs: list[subprocess.Popen], poll: float = 0.2) -> tuple[int, int] | None:
    """Wait for every worker; on the first that fails, stop the others (they would block in the
    next collective until the timeout) and return (its rank, its exit code). None: all exited 0.
    A rank that finishes early (the others after training, while rank 0 generates) is fine."""
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            stop(procs)
            return bad[0]
        if all(c is not None for c in codes):
            return None
        time.sleep(poll)


def stop(procs: list[subprocess.Popen], grace: float = 10.0, patience: float = 0.0) -> None:
    """End the workers still running: after `patience` seconds SIGTERM, after `grace` more SIGKILL."""
    deadline = time.monotonic() + patience
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def failure_message(r: int, code: int, log_file: Path, n: int) -> str:
    """A worker's own `error:` line (a UserError: the same line one process prints), else which
    rank failed and where its log is."""
    last = _last_line(log_file)
    if last.startswith("error: "):
        return last[len("error: ") :]
    how = f"was killed by signal {-code}" if code < 0 else f"failed (exit code {code})"
    return f"trainer=ddp: rank {r} of {n} {how}; see {log_file}"


def _last_line(path: Path) -> str:
    lines = log_tail(path)
    return lines[-1].strip() if lines else ""


def _tee(src, log_file) -> None:
    """Rank 0's output into its log file and onto the launcher's console, chunk by chunk (progress
    bars end lines with \\r, so reading whole lines would hold them back)."""
    while chunk := os.read(src.fileno(), 1 << 16):
        log_file.write(chunk)
        log_file.flush()
        try:
            sys.stdout.buffer.write(chunk)
        except AttributeError:  # a replaced stdout (pytest's capture) has no byte buffer
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def _close_mlflow_run(cfg: DictConfig, out: Path) -> None:
    """Rank 0 stopped by the launcher (another rank failed) cannot end its MLflow run: end it."""
    run_file = out / "mlflow_run_id"
    if not cfg.tracking.enabled or not run_file.is_file():
        return
    from summarizer import tracking

    try:
        uri = tracking.resolve_uri(cfg.tracking.uri, Path.cwd())
        tracking.end_run_if_running(uri, run_file.read_text("utf-8").strip(), "FAILED", "FAIL")
    except Exception as e:  # the error to report is the rank's, not this
        log.warning("could not mark the MLflow run failed: %s", e)


# --- a worker process ----------------------------------------------------------------------------


def main() -> None:
    """`python -m summarizer.distributed -|CONFIG.yaml`: one DDP worker (started by `launch`)."""
    from summarizer import tracking
    from summarizer.config import Config, register_configs
    from summarizer.pipeline import run

    register_configs()
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s][rank{rank()}][%(name)s][%(levelname)s] - %(message)s",
        stream=sys.stdout,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(tracking.RedactSecrets())
    source = sys.argv[1] if len(sys.argv) > 1 else "-"
    text = sys.stdin.read() if source == "-" else Path(source).read_text("utf-8")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))  # typed, as Hydra
    error = None
    try:
        run(cfg)
    except UserError as e:
        error = e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if error is not None:
        log.error("%s", error)
        sys.stdout.flush()  # the error line must come last in the rank's log (the launcher reads it)
        print(f"error: {tracking.redact(str(error))}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
