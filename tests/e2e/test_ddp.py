"""Slow tier: `python -m summarizer distributed=ddp distributed.nproc=2` on the CPU (gloo, two ranks
started through torchrun's elastic agent) against a one-process run with the same global batch.

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
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

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
DDP = [*COMMON, "distributed=ddp", "distributed.nproc=2", "train.batch_size=2"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    for name, overrides in (("one", ONE), ("ddp", DDP)):
        proc = run_cli(tmp, name, *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
    by_mode = {r.data.tags["choice.distributed"]: r for r in runs(tmp)}
    assert len(runs(tmp)) == 2 and set(by_mode) == {"single", "ddp"}  # one MLflow run each
    return tmp, by_mode


def test_ddp_run_writes_one_set_of_outputs_and_one_mlflow_run(pair):
    tmp, by_mode = pair
    out = tmp / "ddp"
    for name in ("config.yaml", "split.json", "adapter/adapter_config.json", "mlflow_run_id"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["state"] == "COMPLETE" and result["value"] is not None
    assert len(list(csv.DictReader(open(out / "predictions.csv", encoding="utf-8")))) == 8
    for rank in (0, 1):  # torchrun's log folder per rank
        (log,) = (out / "ddp").glob(f"*/attempt_0/{rank}/stdout.log")
        assert "validation rows" in log.read_text(), rank  # the rank's own pipeline log
    assert not list(out.glob(".hydra-*"))  # the ranks add no Hydra record of their own
    # Both ranks' RNG states are in the checkpoint, and in its manifest (written after a barrier).
    ckpt = out / "checkpoints" / "checkpoint-2"
    manifest = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest)
    run = by_mode["ddp"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddp.world_size"] == "2"
    assert run.data.tags["overrides"].startswith("model=tiny")  # the launching job's Hydra choices
    for key in ("final_train_tokens_per_second", "eval_loss", "rouge_sum", "final_train_loss_avg"):
        assert key in run.data.metrics, key
    assert run.data.metrics["final_train_tokens_per_second"] > 0


def test_ddp_trains_like_one_process_with_the_same_global_batch(pair):
    tmp, by_mode = pair
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
    m1, m2 = by_mode["single"].data.metrics, by_mode["ddp"].data.metrics
    for key in ("final_train_loss_avg", "final_eval_loss"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    # tokens/s sums both ranks' tokens: the token count of the job equals the one process's.
    tokens = [m["final_train_tokens_per_second"] * m["final_train_seconds"] for m in (m1, m2)]
    assert tokens[1] == pytest.approx(tokens[0], rel=1e-6)


def _logged_steps(out) -> list[tuple[float, float]]:
    """(train loss, gradient norm) of each step, as the trainer logged them."""
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    return [(e["loss"], e["grad_norm"]) for e in state["log_history"] if "grad_norm" in e]


def test_resume_continues_on_every_rank_from_the_checkpoint(pair):
    """train.resume=true in a DDP run's folder (a copy of it, cut off after its checkpoint): every
    rank composes the same overrides, checks the folder and loads checkpoint-2 (both ranks' RNG
    states), and rank 0 continues the same MLflow run instead of starting another."""
    tmp, by_mode = pair
    out = tmp / "resumed"
    shutil.copytree(tmp / "ddp", out)
    for name in ("result.json", "predictions.csv", "adapter"):  # what comes after training
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    proc = run_cli(tmp, "resumed", *DDP, "train.resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["state"] == "COMPLETE"
    attempts = sorted((out / "ddp").glob("*/attempt_0"))  # the copied run's, then the resumed one's
    assert len(attempts) == 2
    for rank in (0, 1):
        text = (attempts[-1] / str(rank) / "stdout.log").read_text()
        assert "checkpoint-2 (step 2)" in text, rank  # fit's "resuming from ..." line, every rank
    before = load_file(tmp / "ddp" / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    for key in before:  # the checkpoint's weights, not a fresh start
        assert torch.equal(before[key], after[key]), key
    assert len(runs(tmp)) == 2  # no new MLflow run
    (run,) = [r for r in runs(tmp) if r.info.run_id == by_mode["ddp"].info.run_id]
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == "checkpoint-2"


def test_a_ranks_user_error_is_the_jobs_one_error_line(tmp_path):
    """A UserError in the ranks (a missing data file) ends the job with the `error:` line and exit
    code a one-process run gives."""
    proc = run_cli(tmp_path, "missing", *DDP, "data.path=nowhere.csv", "tracking.enabled=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: data file not found: nowhere.csv"


# Two gloo ranks evaluate three times; rank 0's trial says "prune" at step 4.
PRUNE = """
import pathlib, sys
import optuna, torch.distributed as dist
from summarizer.train.callbacks import ReportToTrial
dist.init_process_group("gloo")
class Trial:
    number = 7
    def report(self, value, step):
        self.step = step
    def should_prune(self):
        return self.step >= 4
    def set_user_attr(self, key, value):  # where it was pruned, for the sweep report
        self.attrs = {key: value}
class State:
    global_step = 0
hook = ReportToTrial(Trial() if dist.get_rank() == 0 else None)  # only rank 0 holds the trial
for State.global_step in (2, 4, 6):
    try:
        hook.on_evaluate(None, State, None, metrics={"eval_loss": 1.0})
    except optuna.TrialPruned as e:  # one file per rank: two ranks' prints can interleave
        (pathlib.Path(sys.argv[1]) / f"rank{dist.get_rank()}.txt").write_text(f"{e}\\n")
        break
dist.destroy_process_group()
"""


def test_ddp_pruning_stops_every_rank_at_the_same_step(tmp_path):
    script = tmp_path / "prune.py"
    script.write_text(PRUNE)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(2):
        said = (tmp_path / f"rank{r}.txt").read_text()
        assert said == "trial 7 pruned at step 4 (eval_loss 1.0000)\n", r
