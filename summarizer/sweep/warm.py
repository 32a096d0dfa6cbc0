"""A trial process started ahead of its trial (`hydra.sweeper.warm_start`): it imports what a run
needs (torch, transformers, peft, trl, datasets, the pipeline: 10-25 s of a short trial) while the
worker's current trial runs, then waits for one line on stdin, the next trial's
`{"args": [...], "log": path}`, points its stdout and stderr at that log and runs
`python -m summarizer <args>` in this same process. End of input (no next trial): it exits."""

from __future__ import annotations

import json
import os
import runpy
import sys

# what `python -m summarizer` sets before these libraries are imported
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "hydra",
    "optuna",
    "summarizer.pipeline",
    "summarizer.model",
    "summarizer.train.fit",
    "summarizer.generate",
    "summarizer.metrics",
]


def main() -> None:
    import importlib
    import time

    t0 = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # the trial imports it again and reports the error
            continue
    preload_s = time.monotonic() - t0
    line = sys.stdin.readline()
    if not line.strip():
        return  # the worker ended without a next trial
    job = json.loads(line)
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(
        f"warm start: libraries imported ahead of this trial ({preload_s:.1f} s)", file=sys.stderr
    )
    sys.argv = ["summarizer", *job["args"]]
    runpy.run_module("summarizer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
