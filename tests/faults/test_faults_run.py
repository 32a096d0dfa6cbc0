"""Fault suite: what a user does to a run from outside its settings (the run folder, the disk, a
signal, the environment, the wrong command) ends in ONE `error:` line with its exit code, before
any training is wasted, with nothing created and nothing lost.

The command line runs in-process (`runpy`, as `python -m summarizer` does) where the case needs the
real entry point but no real process; a subprocess only for a real signal or a start-up timing.
"""

from __future__ import annotations

import errno
import logging
import os
import runpy
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from summarizer import pipeline
from summarizer.errors import UserError
from summarizer.train.checkpoints import checkpoint_problem
from tests.faults.helpers import TINY, World, compose_run, digest, last_error, popen_cli


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def one_error(stderr: str) -> str:
    """The single `error:` line, the last one printed, with no traceback before it."""
    line = last_error(stderr)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert sum(x.startswith("error:") for x in stderr.splitlines()) == 1, stderr[-3000:]
    return line


def mlflow_runs(db: Path) -> list:
    if not db.exists():
        return []
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, cache_dir):
    """`python -m summarizer <overrides>` in this process: (exit code, stderr). Its run folder is
    tmp_path/run and its MLflow store tmp_path/mlflow.db unless the overrides name others."""

    def run(*overrides: str, env: dict | None = None, skip: tuple = ()) -> tuple[int, str]:
        defaults = {
            "hydra.run.dir": str(tmp_path / "run"),
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "cache_dir": cache_dir,
        }
        given = {o.split("=", 1)[0] for o in overrides} | set(skip)
        args = [*overrides, *(f"{k}={v}" for k, v in defaults.items() if k not in given)]
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capsys.readouterr()
        with monkeypatch.context() as m:
            for name in ("HYDRA_FULL_ERROR", "SUMMARIZER_HYDRA_ERRORS"):  # cli() sets them
                m.delenv(name, raising=False)
            for name, value in {"HF_HUB_OFFLINE": "1", **(env or {})}.items():
                m.setenv(name, value)
            m.setattr(sys, "argv", ["summarizer", *args])
            absl = sys.modules.get("absl.logging")  # imported with ROUGE
            if absl:  # Hydra's logging set-up closes its handler's stream unless it is sys.stderr
                m.setattr(absl.get_absl_handler().python_handler, "stream", sys.stderr)
            try:
                runpy.run_module("summarizer", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code
            finally:  # Hydra configured logging for the job: back to pytest's
                for h in root.handlers:
                    if h not in handlers:
                        h.close()
                root.handlers[:], root.level = handlers, level
        return code, capsys.readouterr().err

    return run


# --- values preflight rejects: one line, exit 2, no run folder, no MLflow run ---------------------

REJECTED = {
    # overrides: the error line after "error: "
    "lora.r=-4": "lora.r=-4 must be a positive integer",
    "generate.max_new_tokens=0": "generate.max_new_tokens=0: expected a number >= 1",
    "generate.batch_size=0": "generate.batch_size=0: expected a number >= 1",
    "generate.num_beams=0": "generate.num_beams=0: expected a number >= 1",
    "generate.do_sample=true generate.temperature=0": (
        "generate.temperature=0.0 with generate.do_sample=true: expected > 0"
    ),
    "generate.strategy=mbr generate.mbr.candidates=1": "generate.mbr.candidates=1: expected >= 2",
    "generate.strategy=greedy generate.num_beams=4": (
        "generate.strategy=greedy with generate.num_beams=4: beams are generate.strategy=beam"
    ),
    "metric.tokenizer=bogus": "metric.tokenizer='bogus': expected auto, mecab, whitespace or",
    "train.eval_steps=0": "train.eval_steps=0: expected a step count >= 1",
    "train.scheduler=bogus": "train.scheduler='bogus': expected one of linear, cosine,",
    "train.max_steps=0": "train.max_steps=0: expected -1 (train.epochs) or >= 1",
    "data.val_size=1.5": "data.val_size=1.5: expected a fraction below 1",
    "data.language=fr": "data.language='fr': the prompt has texts for en, ko only",
    "train.max_length=100000": (
        "train.max_length=100000 is longer than model=tiny's context (4096 tokens, "
        "max_position_embeddings); set train.max_length <= 4096"
    ),
    "sweep=tiny_cpu": (
        "sweep=tiny_cpu is an Optuna sweep: add --multirun (python -m summarizer --multirun "
        "sweep=tiny_cpu ...) or run make sweep SWEEP=tiny_cpu"
    ),
}


@pytest.mark.parametrize("overrides", list(REJECTED))
def test_a_rejected_value_leaves_no_run_folder(cli, tmp_path, overrides):
    code, stderr = cli("model=tiny", *overrides.split())
    assert code == 2, stderr[-3000:]
    assert one_error(stderr).startswith(f"error: {REJECTED[overrides]}")
    assert not (tmp_path / "run").exists(), "the rejected run left its folder"
    assert mlflow_runs(tmp_path / "mlflow.db") == []


def test_a_folder_that_held_anything_is_kept(cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    earlier = tmp_path / "earlier"  # a refused invocation's folder from before: .hydra and a log
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / ".hydra" / "config.yaml").write_text("x: 1\n")
    (earlier / "__main__.log").write_text("[...] lora.r=0 must be a positive integer\n")
    before = digest(earlier)
    for folder in (mine, earlier):
        code, stderr = cli("model=tiny", "lora.r=-4", f"hydra.run.dir={folder}")
        assert code == 2 and one_error(stderr).startswith("error: lora.r=-4")
    assert (mine / "notes.txt").read_text() == "mine"
    assert digest(earlier)[".hydra/config.yaml"] == before[".hydra/config.yaml"]
    assert (earlier / "__main__.log").read_text().startswith("[...] lora.r=0")


def test_a_rejected_value_fails_fast_through_the_real_command(tmp_path):
    """No training library is imported before preflight (torch and ROUGE's are)."""
    start = time.monotonic()
    proc = popen_cli(tmp_path, "fast", "lora.r=-4")
    _, stderr = proc.communicate(timeout=120)
    seconds = time.monotonic() - start
    assert (
        proc.returncode == 2 and one_error(stderr) == "error: lora.r=-4 must be a positive integer"
    )
    assert not (tmp_path / "fast").exists() and not (tmp_path / "mlflow.db").exists()
    assert seconds < 10, f"{seconds:.1f} s to reject a value"
    assert "kernels-community" not in stderr  # bitsandbytes is not even imported


# --- the run folder itself is read-only ---------------------------------------------------------


def test_read_only_run_folder(cli, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)  # what a user has; root writes anyway, so the refusal is simulated as well
    real_open = logging.FileHandler._open

    def refuse(self):
        if Path(self.baseFilename).parent == ro:
            raise PermissionError(errno.EACCES, "Permission denied", self.baseFilename)
        return real_open(self)

    monkeypatch.setattr(logging.FileHandler, "_open", refuse)
    try:
        code, stderr = cli("model=tiny", f"hydra.run.dir={ro}")
    finally:
        ro.chmod(0o755)
    assert code == 2
    assert one_error(stderr) == (
        f"error: cannot write the run folder {ro} (Permission denied); pick another hydra.run.dir"
    )
    assert list(ro.iterdir()) == [] and mlflow_runs(tmp_path / "mlflow.db") == []


# --- the disk fills up while a checkpoint or the adapter is saved --------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir) -> World:
    w = World(tmp_path_factory.mktemp("run-faults"), cache_dir)
    w.earlier = w.tmp / "earlier"
    pipeline.run(w.cfg("earlier"))
    w.record()
    return w


def _status(world: World, out: Path) -> str:
    (run,) = [r for r in world.runs() if r.data.tags.get("output_dir") == str(out)]
    return run.info.status


TORCH_FULL = (
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
    "data/0: file write failed"
)


def test_disk_full_while_saving_a_checkpoint(world, monkeypatch):
    import torch

    out = world.tmp / "full-checkpoint"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise RuntimeError(TORCH_FULL)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError) as err:
        pipeline.run(world.cfg(out.name))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"disk full while saving {out}/checkpoints/checkpoint-2; ")
    assert f"the last good checkpoint {out}/checkpoints/checkpoint-1 is kept" in message
    assert "free space, then resume with: python -m summarizer" in message
    assert message.endswith(f"hydra.run.dir={out} train.resume=true")
    assert not (out / "checkpoints" / "checkpoint-2").exists()  # half-written: removed
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-1") is None
    assert _status(world, out) == "FAILED" and not (out / "adapter").exists()
    world.assert_intact(out)
    monkeypatch.undo()  # space freed: the resume finishes the run
    pipeline.run(world.cfg(out.name, "train.resume=true"))
    assert _status(world, out) == "FINISHED" and (out / "adapter").is_dir()
    world.record()


def test_disk_full_while_saving_the_adapter(world, monkeypatch):
    import peft

    out = world.tmp / "full-adapter"

    real_save = peft.PeftModel.save_pretrained

    def save(self, path, *args, **kwargs):
        if Path(path).name != "adapter":  # a checkpoint's copy
            return real_save(self, path, *args, **kwargs)
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", save)
    with pytest.raises(UserError) as err:
        pipeline.run(world.cfg(out.name))
    message = str(err.value)
    assert message.startswith(f"disk full while saving {out}/adapter; ") and "\n" not in message
    assert f"the last good checkpoint {out}/checkpoints/checkpoint-2 is kept" in message
    assert message.endswith(f"hydra.run.dir={out} train.resume=true")
    assert not (out / "adapter").exists()
    assert _status(world, out) == "FAILED"
    world.assert_intact(out)


def test_disk_full_is_told_from_other_errors():
    from summarizer.train.resume import is_disk_full

    assert is_disk_full(RuntimeError(TORCH_FULL))
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("safetensors: io error") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))


# --- train.max_length beyond the model's context: from the model's config, before its weights -----


def test_max_length_beyond_a_local_models_context(cli, tiny, tmp_path):
    from summarizer.config import ModelConfig, QuantConfig
    from summarizer.model import build_model

    model, tokenizer = tiny
    folder = tmp_path / "local-model"  # a config and a tokenizer, no weights: none may be read
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    code, stderr = cli("model.source=local", f"model.path={folder}", "train.max_length=100000")
    assert code == 2 and not (tmp_path / "run").exists()
    assert one_error(stderr).startswith(
        "error: train.max_length=100000 is longer than model=gemma3_270m's context (4096 tokens"
    )
    cfg = ModelConfig(name="mine", source="local", path=str(folder), dtype="float32")
    with pytest.raises(UserError, match=r"train.max_length=5000 is longer than model=mine's"):
        build_model(cfg, QuantConfig(), str(tmp_path / "cache"), max_length=5000)


# --- Ctrl-C and SIGTERM: one line naming the checkpoint and the command that resumes -------------


def _stop_after_training(monkeypatch, stop):
    real_fit = pipeline.fit

    def fit(*args, **kwargs):
        figures = real_fit(*args, **kwargs)  # checkpoints 1 and 2 are saved
        stop()
        return figures

    monkeypatch.setattr(pipeline, "fit", fit)


def _ctrl_c():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises in this thread


@pytest.mark.parametrize(
    "how, code, why",
    [(_ctrl_c, 130, "interrupted (Ctrl-C)"), (_sigterm, 143, "stopped by SIGTERM")],
    ids=["ctrl-c", "sigterm"],
)
def test_interrupted_run_says_how_to_resume(world, cli, monkeypatch, how, code, why):
    out = world.tmp / f"stopped-{code}"
    args = [*TINY, f"hydra.run.dir={out}", f"tracking.uri={world.uri}"]
    _stop_after_training(monkeypatch, how)
    handler = signal.getsignal(signal.SIGTERM)
    got, stderr = cli(*args)
    assert signal.getsignal(signal.SIGTERM) == handler  # the run's handler is gone again
    assert got == code
    line = one_error(stderr)
    assert line.startswith(f"error: {why}; the last good checkpoint {out}/checkpoints/checkpoint-2")
    assert line.endswith(f"hydra.run.dir={out} train.resume=true")
    assert _status(world, out) == "KILLED"
    world.assert_intact(out)
    monkeypatch.undo()
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "summarizer"]
    got, stderr = cli(*command[3:])  # the printed command, as given
    assert got == 0, stderr[-3000:]
    assert _status(world, out) == "FINISHED"
    world.record()


def test_interrupted_before_the_first_checkpoint(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.data, "load", lambda *a, **k: _ctrl_c())
    code, stderr = cli(*TINY)
    assert code == 130
    line = one_error(stderr)
    assert line.startswith("error: interrupted (Ctrl-C); no checkpoint was saved yet")
    assert "start it again: python -m summarizer model=tiny" in line and "hydra.run.dir" not in line


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_real_signal_mid_training(tmp_path, sig, code):
    """The real command, stopped by a real signal while it trains: one line, its exit code, the
    MLflow run KILLED; and none of the library start-up noise a user cannot act on."""
    long_run = [o for o in TINY if not o.startswith("train.max_steps")] + ["train.max_steps=400"]
    proc = popen_cli(tmp_path, "run", *long_run)
    # Any finished checkpoint: with one every step, checkpoint-2 is rotated away (save_total_limit)
    # within a fraction of a second, and a poll that missed it let the run train all 400 steps.
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(checkpoints.glob("checkpoint-*/checksums.json")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    line = one_error(stderr)
    assert f"the last good checkpoint {tmp_path / 'run'}/checkpoints/checkpoint-" in line
    assert line.endswith(f"hydra.run.dir={tmp_path / 'run'} train.resume=true")
    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.info.status == "KILLED"
    for noise in ("kernels-community", "gradient_checkpointing` is deprecated", "mtime may not"):
        assert noise not in stdout + stderr, noise


# --- MLFLOW_TRACKING_URI ----------------------------------------------------------------------


def test_mlflow_tracking_uri_from_the_environment(cli, tmp_path):
    env_db, flag_db = tmp_path / "env.db", tmp_path / "flag.db"
    quick = [*TINY, "stages.train=false"]  # the model, one MLflow run, nothing trained
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{env_db}"}
    code, stderr = cli(*quick, f"hydra.run.dir={tmp_path / 'a'}", env=env, skip=("tracking.uri",))
    assert code == 0, stderr[-3000:]
    assert len(mlflow_runs(env_db)) == 1 and not (tmp_path / "mlflow.db").exists()
    assert OmegaConf.load(tmp_path / "a" / "config.yaml").tracking.uri == f"sqlite:///{env_db}"
    # an explicit tracking.uri= wins over the variable
    code, stderr = cli(
        *quick, f"hydra.run.dir={tmp_path / 'b'}", f"tracking.uri=sqlite:///{flag_db}", env=env
    )
    assert code == 0, stderr[-3000:]
    assert len(mlflow_runs(flag_db)) == 1 and len(mlflow_runs(env_db)) == 1


# --- predict -----------------------------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path, cache_dir) -> Path:
    """A run's folder as predict reads it first: its config (predict fails before the adapter)."""
    folder = tmp_path / "a-run"
    folder.mkdir()
    cfg = compose_run([], folder, f"sqlite:///{tmp_path / 'mlflow.db'}", cache_dir)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return folder


def predict(capsys, *argv: str) -> tuple[int, str]:
    from summarizer.cli import predict as cmd

    capsys.readouterr()
    code = cmd.main(list(argv))
    return code, capsys.readouterr().err


def test_predict_missing_column_names_what_predict_reads(run_folder, tmp_path, capsys):
    table = tmp_path / "new.csv"
    table.write_text("fname,text\nx1,#Person1#: hi\n", encoding="utf-8")
    code, stderr = predict(capsys, str(run_folder), "--input", str(table))
    assert code == 2
    line = one_error(stderr)
    assert line.startswith(
        f"error: {table}: missing column(s) ['dialogue']; found ['fname', 'text']"
    )
    assert f"data.dialogue_column='dialogue' in {run_folder / 'config.yaml'}" in line
    assert "rename the input's columns" in line and "set data." not in line
    assert not Path(f"{table}.predictions.csv").exists()


def test_predict_rejects_max_new_tokens_zero(run_folder, tmp_path, capsys):
    table = tmp_path / "new.csv"
    table.write_text("fname,dialogue\nx1,#Person1#: hi\n", encoding="utf-8")
    code, stderr = predict(capsys, str(run_folder), "--input", str(table), "--max-new-tokens", "0")
    assert code == 2
    assert one_error(stderr) == "error: generate.max_new_tokens=0: expected a number >= 1"
    assert not Path(f"{table}.predictions.csv").exists()


# --- start-up noise ------------------------------------------------------------------------------


def test_only_the_noise_a_user_cannot_act_on_is_dropped(caplog):
    from summarizer.tracking import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn(
            "`gradient_checkpointing` is deprecated and will be removed",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn(
            "Argument ``x`` is experimental (supported from v3.0.0).", UserWarning, stacklevel=1
        )
        warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)  # someone else's: kept
    assert [str(w.message) for w in seen] == ["`foo` is deprecated"]
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module")
        bnb.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
