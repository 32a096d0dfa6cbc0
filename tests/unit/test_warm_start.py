"""hydra.sweeper.warm_start: the switch, and a spare that cannot be used is never used (the trial
starts cold instead); the spare taking a trial over is tested by the Wilcoxon sweep (e2e)."""

import os
import sys

import pytest

from summarizer.errors import UserError
from summarizer.sweep import jobs
from summarizer.sweep.sweeper import warm_start


def test_the_switch_is_auto_true_or_false_and_auto_means_trials_on_gpus():
    assert warm_start("auto", True) and not warm_start("auto", False)
    assert warm_start(True, False) and warm_start("true", False)
    assert not warm_start(False, True) and not warm_start("false", True)
    with pytest.raises(UserError, match=r"hydra.sweeper.warm_start='sometimes': expected auto"):
        warm_start("sometimes", True)


def test_a_spare_for_another_environment_or_one_that_died_is_not_taken(tmp_path):
    env = dict(os.environ)
    spare = jobs.Spare()
    spare.start(tmp_path, env)
    proc = spare.proc
    # another GPU (environment): killed, and the caller starts the trial cold
    assert spare.take(tmp_path, {**env, "CUDA_VISIBLE_DEVICES": "1"}, [], tmp_path / "l") is None
    assert proc.poll() is not None and spare.proc is None
    spare.start(tmp_path, env)
    spare.proc.kill()
    spare.proc.wait()
    assert spare.take(tmp_path, env, [], tmp_path / "l") is None  # it died meanwhile
    assert spare.take(tmp_path, env, [], tmp_path / "l") is None  # none started
    spare.start(tmp_path, env)
    proc = spare.proc
    spare.close()  # the worker ended: the spare goes with it
    assert proc.poll() is not None and not (tmp_path / "l").exists()


def test_a_spare_at_the_end_of_its_input_exits_without_running_anything(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "summarizer.sweep.warm"], input="", capture_output=True,
        text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0 and not list(tmp_path.iterdir())
