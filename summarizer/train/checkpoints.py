"""Checkpoint integrity: a manifest (size + sha256 of every file) written last in each checkpoint,
checks that tell a complete checkpoint from a damaged or cut-off one, and the train-loss sum an
exact resume needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from summarizer.errors import UserError
from summarizer.files import write_atomic

log = logging.getLogger(__name__)


LOSS_STATE = "summarizer_state.json"  # in each checkpoint: the train-loss sum so far (exact resume)


MANIFEST = "checksums.json"  # in each checkpoint: size + sha256 of every file, written last


def write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    write_atomic(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """Why training cannot resume from `folder` (a file missing, truncated or altered), else None.
    Our checkpoints are checked against their manifest; others (or one cut off before its manifest)
    by structure: JSON parses, safetensors sizes match their header, torch files pass their CRCs."""
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (its saving was cut off)"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, meta in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != meta["size"]:
                return f"{name} has {path.stat().st_size} bytes, {meta['size']} were saved"
            if _sha256(path) != meta["sha256"]:
                return f"{name} differs from the saved file (checksum)"
        return None
    try:
        int(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "trainer_state.json is not a valid trainer state"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    weights = [
        p for p in folder.iterdir() if re.match(r"(adapter_)?model.*\.(safetensors|bin)$", p.name)
    ]
    if not weights:
        return "no model or adapter weights"
    for path in sorted(folder.iterdir()):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _torch_file_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else size
        if n > size - 8:
            return "is truncated"
        try:
            header = json.loads(f.read(n))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return "has a garbled header"
    if 8 + n + end != size:
        return f"has {size} bytes, its header says {8 + n + end}"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive with CRC-32s: truncation or altered bytes show."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "is truncated or not a torch file"
    return f"is altered (bad CRC in {bad})" if bad else None


def verify_checkpoint(path: str | Path, key: str) -> None:
    """A one-line error naming the checkpoint when it cannot be resumed from."""
    problem = checkpoint_problem(Path(path))
    if problem:
        raise UserError(f"{key}: checkpoint {path} is corrupt: {problem}; use an earlier one")


def last_good_checkpoint(folder: Path, save_key: str = "train.save_steps") -> Path:
    """For train.resume: the newest checkpoint-N under `folder`. One whose saving was cut off (a kill
    mid-save: no trainer_state.json) is passed over for the one before; a damaged one is an error."""
    found = sorted(
        (p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for i, ckpt in enumerate(found):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if not (ckpt / "trainer_state.json").is_file():
            log.warning("%s: %s; resuming from an earlier checkpoint", ckpt, problem)
            continue
        earlier = f"delete it to resume from {found[i + 1].name}" if i + 1 < len(found) else ""
        raise UserError(
            f"train.resume=true: checkpoint {ckpt} is corrupt: {problem}; "
            f"{earlier or 'no earlier checkpoint: start a new run (without train.resume)'}"
        )
    raise UserError(
        f"train.resume=true: no complete checkpoint-N in {folder} (the run stopped before its first "
        f"save, see {save_key}): start it again as a new run (without train.resume)"
    )


def resolve_checkpoint(path: str) -> str:
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return str(p)
    last = get_last_checkpoint(str(p)) if p.is_dir() else None
    if not last:
        raise UserError(
            f"train.resume_from={path}: no checkpoint-N folder with trainer_state.json there"
        )
    return last


def _resume_state(checkpoint: Path) -> tuple[int, float | None]:
    """(global step, train-loss sum up to it); the sum is None for a checkpoint saved elsewhere."""
    step = int(json.loads((checkpoint / "trainer_state.json").read_text("utf-8"))["global_step"])
    try:
        saved = json.loads((checkpoint / LOSS_STATE).read_text("utf-8"))
        return step, float(saved["train_loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        log.info(
            "%s has no %s: train_loss_avg covers the resumed steps only", checkpoint, LOSS_STATE
        )
        return step, None
