"""Slow tier: `python -m summarizer trainer=ddp trainer.nproc=2` on the CPU (gloo) against a
one-process run with the same global batch.

Why the runs can be compared tightly: accelerate gives rank r the r-th per-process slice of every
global batch of the same seeded sampler, so both runs train on the same rows at every step, and the
trainer's loss sums token losses over the ranks and divides by the tokens of the whole global batch
(`average_tokens_across_devices`): the gradient of 2 ranks x batch 2 is the gradient of 1 x batch 4.
Only the order of float sums differs (measured: LoRA weights within 1e-8 after 2 steps), hence
tolerances of 1e-6 on the weights and 1e-5 relative on the losses and gradient norms. (AdamW's
update ignores a constant scale of the loss, so the weights alone would not show a DDP loss scaled by
the number of ranks; the logged gradient norms do.) HF's eval loss is the mean of
per-batch token means (no count across ranks there), so both runs evaluate in batches of 4: the same
two batches of the 8 rows, one per rank under DDP.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from summarizer import distributed
from tests.conftest import ROOT
from tests.e2e.test_run import run_cli, runs

pytestmark = pytest.mark.slow

COMMON = [
    "model=tiny",
    "quant=none",
    "train=debug",
    "train.max_steps=2",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.max_length=384",
    "train.eval_rows=8",
    "lora.dropout=0",  # dropout masks are drawn per rank: no bitwise comparison with them
    "train.eval_batch_size=4",
    "generate.max_new_tokens=4",
]
ONE = [*COMMON, "train.batch_size=4"]
DDP = [*COMMON, "trainer=ddp", "trainer.nproc=2", "train.batch_size=2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    for name, overrides in (("one", ONE), ("ddp", DDP)):
        proc = run_cli(tmp, name, *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
    by_trainer = {r.data.tags["choice.trainer"]: r for r in runs(tmp)}
    assert len(runs(tmp)) == 2 and set(by_trainer) == {"single", "ddp"}  # one MLflow run each
    return tmp, by_trainer


def test_ddp_run_writes_one_set_of_outputs_and_one_mlflow_run(pair):
    tmp, by_trainer = pair
    out = tmp / "ddp"
    for name in ("config.yaml", "split.json", "adapter/adapter_config.json", "mlflow_run_id"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["state"] == "COMPLETE" and result["value"] is not None
    assert len(list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))) == 8
    assert (out / "ddp" / "rank0.log").is_file() and (out / "ddp" / "rank1.log").is_file()
    # Both ranks' RNG states are in the checkpoint, and in its manifest (written after a barrier).
    ckpt = out / "checkpoints" / "checkpoint-2"
    manifest = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest)
    run = by_trainer["ddp"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddp.world_size"] == "2"
    assert run.data.tags["overrides"].startswith("model=tiny")  # the launching job's Hydra choices
    for key in ("final_train_tokens_per_second", "eval_loss", "rouge_sum", "final_train_loss_avg"):
        assert key in run.data.metrics, key
    assert run.data.metrics["final_train_tokens_per_second"] > 0


def test_ddp_trains_like_one_process_with_the_same_global_batch(pair):
    tmp, by_trainer = pair
    one = load_file(tmp / "one" / "adapter" / "adapter_model.safetensors")
    ddp = load_file(tmp / "ddp" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == ddp.keys()
    moved = max(float(t.abs().max()) for k, t in one.items() if "lora_B" in k)
    assert moved > 1e-4  # training changed the weights: the comparison means something
    for key in one:
        assert torch.allclose(one[key], ddp[key], atol=1e-6), key
    steps = [_logged_steps(tmp / name) for name in ("one", "ddp")]
    assert len(steps[0]) == len(steps[1]) == 2
    for (loss1, norm1), (loss2, norm2) in zip(*steps):
        assert (loss2, norm2) == (pytest.approx(loss1, rel=1e-5), pytest.approx(norm1, rel=1e-5))
    m1, m2 = by_trainer["single"].data.metrics, by_trainer["ddp"].data.metrics
    for key in ("final_train_loss_avg", "final_eval_loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    # tokens/s sums both ranks' tokens: the token count of the job equals the one process's.
    tokens = [m["final_train_tokens_per_second"] * m["final_train_seconds"] for m in (m1, m2)]
    assert tokens[1] == pytest.approx(tokens[0], rel=1e-6)


def _logged_steps(out) -> list[tuple[float, float]]:
    """(train loss, gradient norm) of each step, as the trainer logged them."""
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    return [(e["loss"], e["grad_norm"]) for e in state["log_history"] if "grad_norm" in e]


def test_a_workers_user_error_is_its_last_line(tmp_path):
    """The worker's side of a UserError (the launcher's side: tests/unit/test_distributed.py): its
    last line is the `error:` line one process prints, which the launcher passes on as is. A world
    of one worker (no process group), so one process's start-up rather than three."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = ["data.path=nowhere.csv", "tracking.enabled=false", f"output_dir={tmp_path}"]
        cfg = compose("config", [*DDP, *overrides])
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}  # a worker, alone
    proc = subprocess.run(
        distributed.worker_command(),
        input=OmegaConf.to_yaml(cfg, resolve=True),
        cwd=ROOT,
        env={**env, "SUMMARIZER_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: data file not found: nowhere.csv"


# Two gloo ranks evaluate three times; rank 0's trial says "prune" at step 4.
PRUNE = """
import optuna, torch.distributed as dist
from summarizer.train.callbacks import ReportToTrial
dist.init_process_group("gloo")
class Trial:
    number = 7
    def report(self, value, step):
        self.step = step
    def should_prune(self):
        return self.step >= 4
class State:
    global_step = 0
hook = ReportToTrial(Trial() if dist.get_rank() == 0 else None)  # only rank 0 holds the trial
for State.global_step in (2, 4, 6):
    try:
        hook.on_evaluate(None, State, None, metrics={"eval_loss": 1.0})
    except optuna.TrialPruned as e:
        print(f"rank {dist.get_rank()}: {e}")
        break
dist.destroy_process_group()
"""


def test_ddp_pruning_stops_every_rank_at_the_same_step():
    port = distributed.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRUNE],
            cwd=ROOT,
            env=distributed.worker_env(r, 2, port, {}),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [f"rank {r}: trial 7 pruned at step 4 (eval_loss 1.0000)" for r in range(2)]
