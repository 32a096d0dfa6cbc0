"""DDP at run time: where this process stands among the ranks, and the few collectives the
pipeline needs (`distributed=ddp`).

`python -m summarizer distributed=ddp ...` is started as `nproc` ranks by PyTorch's elastic agent
(torchrun's, from `summarizer/cli/launch.py`); every rank runs the ordinary pipeline. Each rank
loads the data and the model (on GPU LOCAL_RANK) and trains its share of each batch — HF's Trainer
wraps the model in DDP when WORLD_SIZE is set — and rank 0 alone writes the run's files, logs to
MLflow, reports to Optuna, saves the adapter, generates and scores. The helpers here read the
environment torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE) and are no-ops in a one-process run, so
the pipeline reads the same either way. Running under a torchrun of one's own also works
(`torchrun --nproc-per-node 2 -m summarizer hydra.run.dir=<one folder> ...`): `setup` checks that
every rank got the same folder.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from summarizer.errors import UserError

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
    """Started as a rank by a distributed launcher (torchrun, ours, accelerate launch): it never
    launches again."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def is_main() -> bool:
    return rank() == 0


def _active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


# --- what the config asks for --------------------------------------------------------------------


def resolve_nproc(nproc: int | str, gpus: int | None = None) -> int:
    """Processes for `distributed.nproc`: auto = every visible GPU; a number is checked against
    them."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if str(nproc) == "auto":
        if gpus == 0:
            raise UserError(
                "distributed.nproc=auto counts CUDA GPUs and none is visible; on CPU set "
                "distributed.nproc=N (N gloo processes) or use distributed=single"
            )
        return gpus
    try:
        n = int(nproc)
    except ValueError:
        raise UserError(f"distributed.nproc={nproc!r}: expected auto or a number >= 1") from None
    if n < 1:
        raise UserError(f"distributed.nproc={n}: expected auto or a number >= 1")
    if gpus and n > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UserError(
            f"distributed.nproc={n} but {gpus} GPU(s) are visible"
            f"{f' (CUDA_VISIBLE_DEVICES={visible})' if visible is not None else ''}: DDP runs one "
            f"process per GPU; use distributed.nproc=auto or at most {gpus}"
        )
    return n


def resolve_backend(name: str, cuda: bool | None = None) -> str:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name not in ("nccl", "gloo"):
        raise UserError(f"distributed.backend={name!r}: expected auto, nccl or gloo")
    if name == "nccl" and not cuda:
        raise UserError(
            "distributed.backend=nccl needs CUDA GPUs and none is visible; use "
            "distributed.backend=auto (gloo on CPU)"
        )
    return name


# --- inside a rank --------------------------------------------------------------------------


def setup(dist_cfg, out: Path) -> None:
    """A rank joins the process group (on its own GPU with NCCL) before the run writes anything,
    and checks that every rank writes to the same folder (a torchrun without hydra.run.dir would
    not). HF's Trainer (accelerate) reuses this group. Nothing to do outside DDP."""
    if world_size() <= 1 or dist.is_initialized():
        return
    backend = resolve_backend(dist_cfg.backend)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    folders: list = [None] * world_size()
    dist.all_gather_object(folders, str(out.resolve()))  # also a barrier: all checked `out` first
    if len(set(folders)) > 1:
        raise UserError(
            f"DDP ranks write to different folders ({folders[0]} on rank 0, {folders[1]} on rank "
            "1): give every rank the same hydra.run.dir=... (or use python -m summarizer "
            "distributed=ddp)"
        )


def teardown() -> None:
    """Leave the process group at the end of a rank (NCCL warns of, and may hang on, a group left
    to the interpreter's exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
