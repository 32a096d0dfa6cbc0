"""Fault suite, fast tier: every mistake a user can make ends in ONE clear line naming the key, file
or row, before training when it can, and loses nothing produced earlier.

The command line is run for real where the wording is the CLI's own (composition errors, the run
folder, the MLflow server); pipeline errors run `pipeline.run` in-process on a composed config (the
CLI prints the same message as `error: <message>`, exit code 2: see the CLI cases below).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import torch

from summarizer import pipeline
from summarizer.errors import UserError
from tests.conftest import SAMPLE_EN, SAMPLE_KO
from tests.faults.helpers import World, digest, last_error, popen_cli


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """127.0.0.1 must be reached directly (a proxy would answer for the unreachable server)."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


# --- the command line: composition, run folder, MLflow server -------------------------------------

CLI_CASES = {
    # name: (overrides, the last stderr line after "error: ")
    "unknown-group-option": (
        ["model=gpt5"],
        "model=gpt5: no such option in conf/model (available: gemma3_270m,",
    ),
    "unknown-experiment": (["experiment=cpu_dmeo"], "experiment=cpu_dmeo: no such option"),
    "unknown-key": (["lora.rank=8"], "lora.rank: no such key (Key 'rank' not in 'LoraConfig'"),
    "unknown-top-level-key": (["adaptr=x"], "adaptr: no such key"),
    "wrong-type-int": (["lora.r=sixteen"], "lora.r: Value 'sixteen' of type 'str' could not be"),
    "wrong-type-float": (["train.lr=fast"], "train.lr: Value 'fast' of type 'str' could not be"),
    "wrong-type-bool": (["stages.train=maybe"], "stages.train: Value 'maybe' is not a valid bool"),
    "float-for-int": (["train.max_steps=1.5"], "train.max_steps: Value '1.5' of type 'float'"),
    "run-folder-under-a-file": (["hydra.run.dir={tmp}/a_file/run"], "cannot write the run folder"),
    # A pipeline error through the CLI: the same one line, exit code 2 (more in test_faults_slow).
    "unreachable-mlflow-server": (
        ["model=tiny", "tracking.uri=http://127.0.0.1:9"],
        "tracking.uri=http://127.0.0.1:9: MLflow server not reachable (Connection refused)",
    ),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """All CLI cases, two at a time (each is a Python start-up): {name: (code, stderr, seconds)}."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a_file").write_text("not a folder")

    def one(name: str):
        start = time.monotonic()
        args = [o.format(tmp=tmp) for o in CLI_CASES[name][0]]
        proc = popen_cli(tmp, name, *args)
        _, stderr = proc.communicate(timeout=300)
        return name, (proc.returncode, stderr, time.monotonic() - start)

    slow_first = sorted(CLI_CASES, key=lambda name: "model=tiny" not in CLI_CASES[name][0])
    with ThreadPoolExecutor(max_workers=2) as pool:
        return tmp, dict(pool.map(one, slow_first))


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_error_is_one_line_with_exit_code_2(cli_results, name):
    tmp, results = cli_results
    code, stderr, _ = results[name]
    assert code == 2, stderr[-3000:]
    expected = CLI_CASES[name][1].format(tmp=tmp)
    assert last_error(stderr).startswith(f"error: {expected}"), last_error(stderr)
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr
    if name not in ("unreachable-mlflow-server", "run-folder-under-a-file"):
        assert not (tmp / name).exists(), "a config error created the run folder"
    assert (tmp / "a_file").read_text() == "not a folder"


def test_unreachable_mlflow_server_fails_in_seconds(cli_results, tmp_path):
    from summarizer.config import TrackingConfig
    from summarizer.tracking import preflight

    start = time.monotonic()
    with pytest.raises(UserError, match="MLflow server not reachable") as err:
        preflight(TrackingConfig(uri="http://127.0.0.1:9"), "http://127.0.0.1:9")
    assert time.monotonic() - start < 5 and "\n" not in str(err.value)
    tmp, results = cli_results
    code, _, seconds = results["unreachable-mlflow-server"]
    assert code == 2 and seconds < 60  # Python start-up included (MLflow alone retried ~minutes)
    out = tmp / "unreachable-mlflow-server"
    assert not (out / "config.yaml").exists()  # stopped before writing anything of the run


# --- in-process: the pipeline on a composed config --------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir) -> World:
    w = World(tmp_path_factory.mktemp("faults"), cache_dir)
    w.earlier = w.tmp / "earlier"
    pipeline.run(w.cfg("earlier"))
    assert (w.earlier / "adapter" / "adapter_config.json").is_file()
    w.record()
    return w


def fails(world: World, name: str, *overrides: str) -> str:
    """Run the pipeline; it must raise one UserError line and leave everything else as it was."""
    out = world.tmp / name
    with pytest.raises(UserError) as err:
        pipeline.run(world.cfg(name, *overrides))
    message = str(err.value)
    assert message and "\n" not in message, message
    world.assert_intact(out)
    return message


def data_file(world: World, name: str, content: str | bytes) -> str:
    path = world.tmp / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return f"data.path={path}"


def sample_rows() -> list[list[str]]:
    return list(csv.reader(io.StringIO(SAMPLE_KO.read_text(encoding="utf-8"), newline="")))


def to_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _truncated_mid_quote() -> str:
    text = to_csv(sample_rows())
    last = text.rindex("\ndev_159,") + 1
    return text[: last + 40]  # inside the quoted, multi-line dialogue of the last row


def _truncated_short_row() -> str:
    rows = sample_rows()
    return to_csv(rows[:-1]) + to_csv([rows[-1][:2]])  # the last row lost its summary and topic


def _jsonl_truncated() -> str:
    text = SAMPLE_EN.read_text(encoding="utf-8")
    return text[: len(text) // 2]


def _with(change) -> str:
    rows = sample_rows()
    change(rows)
    return to_csv(rows)


def _set(row: int, col: int, value: str):
    def change(rows):
        rows[row][col] = value

    return change


DATA_CASES = {
    # name: (file name, content or None for a missing file, expected words)
    "missing-file": ("nowhere.csv", None, ["data file not found", "nowhere.csv"]),
    "empty-file": ("empty.csv", "", ["data file is empty", "empty.csv"]),
    "blank-file": ("blank.csv", " \n\n", ["data file is empty"]),
    "non-utf8-file": (
        "cp949.csv",
        SAMPLE_KO.read_text(encoding="utf-8").encode("cp949", errors="replace"),
        ["cp949.csv: not UTF-8 text (bad byte at line 2)", "re-save it as UTF-8"],
    ),
    "truncated-mid-quote": (
        "cut.csv",
        _truncated_mid_quote(),
        ["cut.csv: row 160 is not valid CSV (unexpected end of data)", "truncated"],
    ),
    "truncated-short-row": (
        "short.csv",
        _truncated_short_row(),
        ["short.csv: row 160", "truncated"],
    ),
    "truncated-jsonl": ("cut.jsonl", _jsonl_truncated(), ["cut.jsonl:", "invalid JSON line"]),
    "truncated-json": (
        "cut.json",
        '[{"fname": "a", "dialogue": "x", "sum',
        ["cut.json:1: invalid JSON"],
    ),
    "header-only": ("header.csv", "fname,dialogue,summary,topic\n", ["header only, no rows"]),
    "missing-column": (
        "nosummary.csv",
        to_csv([r[:2] for r in sample_rows()]),
        ["nosummary.csv: missing column(s) ['summary']", "data.summary_column"],
    ),
    "renamed-columns": (
        "renamed.csv",
        _with(lambda rows: rows.__setitem__(0, ["id", "text", "abstract", "topic"])),
        ["missing column(s) ['fname', 'dialogue', 'summary']", "found ['abstract', 'id', 'text'"],
    ),
    "duplicated-ids": (
        "dup.csv",
        _with(lambda rows: rows.__setitem__(9, [rows[2][0], *rows[9][1:]])),
        ["dup.csv: duplicate id 'dev_1' in rows 2 and 9"],
    ),
    "empty-id": ("noid.csv", _with(_set(4, 0, " ")), ["noid.csv: row 4 has an empty 'fname'"]),
    "empty-dialogue": (
        "nodialogue.csv",
        _with(_set(3, 1, "")),
        ["row 3 (id 'dev_2'): empty 'dialogue'", "data.skip_invalid_rows=true"],
    ),
    "empty-summary": (
        "nosummary2.csv",
        _with(_set(7, 2, "  \n ")),
        ["row 7 (id 'dev_6'): empty 'summary'"],
    ),
    "unsupported-format": ("data.xlsx", b"PK\x03\x04", ["unsupported data format '.xlsx'"]),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_file(world, name):
    file_name, content, expected = DATA_CASES[name]
    override = (
        f"data.path={world.tmp / 'data' / file_name}"
        if content is None
        else data_file(world, file_name, content)
    )
    message = fails(world, name, override)
    for words in expected:
        assert words in message, message
    assert not (world.tmp / name / "split.json").exists()  # stopped at the data, before any work


def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _api_key(monkeypatch):
    monkeypatch.setenv("UPSTAGE_API_KEY", "sk-faults-0123456789")


def _no_api_key(monkeypatch):
    monkeypatch.delenv("UPSTAGE_API_KEY", raising=False)


SETTING_CASES = {
    # name: (overrides, expected words, setup)
    "lora-r-zero": (["lora.r=0"], ["lora.r=0 must be a positive integer"], None),
    "lora-r-negative": (["lora.r=-4"], ["lora.r=-4 must be a positive integer"], None),
    "lr-zero": (["train.lr=0"], ["train.lr=0.0 must be > 0"], None),
    "lr-negative": (["train.lr=-1e-4"], ["train.lr=-0.0001 must be > 0"], None),
    "fewshot-k-larger-than-pool": (
        ["prompt=few_shot", "prompt.fewshot.k=8"],
        ["prompt.fewshot.k=8 is larger than the few-shot pool allows (8 training rows"],
        None,
    ),
    "max-length-shorter-than-prompt": (
        ["train.max_length=24"],
        ["max_length=24 is too short", "raise train.max_length"],
        None,
    ),
    "liger-without-gpu": (
        ["train.liger=true"],
        ["train.liger=true needs a CUDA GPU and the liger-kernel package"],
        None,
    ),
    "liger-with-compile": (
        ["train.liger=true", "train.compile=true"],
        ["train.liger=true and train.compile=true do not combine"],
        None,
    ),
    "fused-head-bad-value": (
        ["train.fused_lm_head=yes"],
        ["train.fused_lm_head='yes': expected auto, true or false"],
        None,
    ),
    "cuda-graph-without-gpu": (
        ["train.cuda_graph=true"],
        ["train.cuda_graph=true needs a CUDA GPU; or set train.cuda_graph=auto"],
        None,
    ),
    "pack-multiple-zero": (
        ["train.packing=true", "train.pack_multiple=0"],
        ["train.pack_multiple=0: expected a token count >= 1"],
        None,
    ),
    "cuda-graph-bad-value": (
        ["train.cuda_graph=always"],
        ["train.cuda_graph='always': expected auto, true or false"],
        None,
    ),
    "static-decode-bad-value": (
        ["generate.static_decode=fast"],
        ["generate.static_decode='fast': expected auto, true or false"],
        None,
    ),
    "static-decode-with-sampling": (
        ["generate.static_decode=true", "generate.do_sample=true"],
        ["generate.static_decode=true does greedy decoding only"],
        None,
    ),
    "gpu-preset-on-cpu": (
        ["model=solar"],
        ["model=solar needs a CUDA GPU", "use a local preset: model=gemma3_270m"],
        None,
    ),
    "hub-model-without-hub": (
        ["model=solar", "model.requires_gpu=false", "model.path=no-such-org/no-such-model"],
        ["model=solar: cannot load 'no-such-org/no-such-model'", "hub unreachable"],
        _no_hub,
    ),
    "unwritable-output-dir": (
        [],  # output_dir under a regular file: no folder can be made there, even by root
        ["output_dir=", "is not writable (Not a directory)"],
        None,
    ),
    "unwritable-mlflow-store": (
        ["tracking.uri=sqlite:///{tmp}/a_file/mlflow.db"],
        ["tracking.uri=sqlite:///", "a_file is not writable"],
        None,
    ),
    "unreachable-mlflow-server": (
        ["tracking.uri=http://127.0.0.1:9"],
        ["tracking.uri=http://127.0.0.1:9: MLflow server not reachable"],
        None,
    ),
    "predict-test-without-test-file": (
        ["stages.predict_test=true", "data.test_path=null"],
        ["stages.predict_test=true needs data.test_path"],
        None,
    ),
    "missing-test-file": (
        ["stages.predict_test=true", "data.test_path={tmp}/no_test.csv"],
        ["data file not found", "no_test.csv"],
        None,
    ),
    "augment-api-base-url-not-http": (
        ["augmentation=paraphrase", "augmentation.api.base_url=api.upstage.ai/v1"],
        ["augmentation.api.base_url='api.upstage.ai/v1': expected an http(s) URL"],
        None,
    ),
    "augment-api-key-missing": (
        ["augmentation=paraphrase"],
        ["augmentation.api: no API key: set UPSTAGE_API_KEY in the environment or in"],
        _no_api_key,
    ),
    "augment-api-unreachable": (
        ["augmentation=paraphrase", "augmentation.api.base_url=http://127.0.0.1:9/v1"]
        + ["augmentation.api.max_retries=0", "augmentation.api.requests_per_minute=0"],
        [
            "augmentation.api: http://127.0.0.1:9/v1/chat/completions failed 1 time(s)",
            "the endpoint cannot be reached: check augmentation.api.base_url",
            "replies are cached",
        ],
        _api_key,
    ),
}


@pytest.mark.parametrize("name", list(SETTING_CASES))
def test_bad_setting(world, name, monkeypatch):
    overrides, expected, setup = SETTING_CASES[name]
    if name in ("gpu-preset-on-cpu", "liger-without-gpu", "cuda-graph-without-gpu") and (
        torch.cuda.is_available()
    ):
        pytest.skip("a GPU is present")
    if setup:
        setup(monkeypatch)
    (world.tmp / "a_file").write_text("not a folder")
    overrides = [o.format(tmp=world.tmp) for o in overrides]
    if name == "unwritable-output-dir":
        out = world.tmp / "a_file" / "run"
        with pytest.raises(UserError) as err:
            pipeline.run(world.cfg("a_file/run"))
        message = str(err.value)
        assert str(out) in message
    else:
        message = fails(world, name, *overrides)
    for words in expected:
        assert words in message, message
    assert not (world.tmp / name / "checkpoints").exists()  # before any training
    world.assert_intact()


def test_nan_loss_stops_at_once_and_fails_the_run(world):
    message = fails(world, "nan", "train.lr=1e30", "train.max_steps=20", "train.save_steps=50")
    assert message.startswith("loss became nan at step ") and "lower train.lr" in message
    step = int(message.split("at step ")[1].split(";")[0])
    assert step <= 3  # logging_steps=1: the first logged NaN stops it
    (run,) = [r for r in world.runs() if r.data.tags.get("output_dir") == str(world.tmp / "nan")]
    assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"
    assert not (world.tmp / "nan" / "adapter").exists()


def test_stop_on_non_finite_names_the_key_and_step():
    from types import SimpleNamespace

    from summarizer.train.callbacks import StopOnNonFinite

    state = SimpleNamespace(global_step=7)
    StopOnNonFinite().on_log(None, state, None, logs={"loss": 1.5, "eval_loss": 2.0})
    for key, value in [("loss", float("inf")), ("eval_loss", float("nan"))]:
        with pytest.raises(UserError, match=f"{key} became {value} at step 7"):
            StopOnNonFinite().on_log(None, state, None, logs={key: value})


# --- resume: a cut-off run continued in its own folder ---------------------------------------------


@pytest.fixture(scope="module")
def cutoff(world) -> Path:
    """A run as a kill after its step-2 checkpoint leaves it: MLflow run RUNNING, no adapter,
    no result; copies of it are damaged in the cases below."""
    out = world.tmp / "cutoff"
    pipeline.run(world.cfg("cutoff"))
    run_id = (out / "mlflow_run_id").read_text()
    mlflow.MlflowClient(world.uri).update_run(run_id, status="RUNNING")
    for name in ("adapter", "result.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    world.record()
    return out


def damaged(world: World, cutoff: Path, name: str, damage) -> Path:
    copy = world.tmp / name
    shutil.copytree(cutoff, copy)
    (copy / "mlflow_run_id").unlink()  # the copy must never touch the cut-off run's MLflow run
    damage(copy / "checkpoints")
    return copy


def _truncate(rel: str):
    def damage(ckpts: Path):
        path = ckpts / rel
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def _flip(rel: str):
    def damage(ckpts: Path):
        path = ckpts / rel
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte altered
        path.write_bytes(bytes(data))

    return damage


def _no_manifest_and(damage):
    def both(ckpts: Path):
        for manifest in ckpts.glob("checkpoint-*/checksums.json"):
            manifest.unlink()  # a checkpoint from elsewhere: checked by structure
        damage(ckpts)

    return both


RESUME_CASES = {
    # name: (damage, expected words)
    "truncated-adapter": (
        _truncate("checkpoint-2/adapter_model.safetensors"),
        ["checkpoint-2 is corrupt: adapter_model.safetensors has", "resume from checkpoint-1"],
    ),
    "altered-optimizer": (
        _flip("checkpoint-2/optimizer.pt"),
        ["checkpoint-2 is corrupt: optimizer.pt differs from the saved file (checksum)"],
    ),
    "garbled-trainer-state": (
        lambda c: (c / "checkpoint-2" / "trainer_state.json").write_text("{garbled"),
        ["checkpoint-2 is corrupt: trainer_state.json"],
    ),
    "truncated-optimizer-without-manifest": (
        _no_manifest_and(_truncate("checkpoint-2/optimizer.pt")),
        ["checkpoint-2 is corrupt: optimizer.pt is truncated or not a torch file"],
    ),
    "altered-rng-without-manifest": (
        _no_manifest_and(_flip("checkpoint-2/rng_state.pth")),
        ["checkpoint-2 is corrupt: rng_state.pth is altered (bad CRC"],
    ),
    "truncated-weights-without-manifest": (
        _no_manifest_and(_truncate("checkpoint-2/adapter_model.safetensors")),
        ["checkpoint-2 is corrupt: adapter_model.safetensors"],
    ),
    "no-checkpoint": (
        lambda c: shutil.rmtree(c),
        ["no complete checkpoint-N in", "start it again as a new run"],
    ),
    "only-checkpoint-cut-off": (
        lambda c: [
            shutil.rmtree(c / "checkpoint-1"),
            (c / "checkpoint-2/trainer_state.json").unlink(),
        ],
        ["no complete checkpoint-N in"],
    ),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_from_a_damaged_checkpoint(world, cutoff, name):
    damage, expected = RESUME_CASES[name]
    copy = damaged(world, cutoff, name, damage)
    before = digest(copy)
    message = fails(world, name, "train.resume=true")
    assert message.startswith("train.resume=true: ")
    for words in expected:
        assert words in message, message
    assert str(copy) in message
    assert digest(copy) == before


def test_resume_from_named_corrupt_checkpoint(world, cutoff):
    copy = damaged(world, cutoff, "named", _flip("checkpoint-1/adapter_model.safetensors"))
    message = fails(
        world, "named-new", f"train.resume_from={copy / 'checkpoints' / 'checkpoint-1'}"
    )
    assert message.startswith(f"train.resume_from: checkpoint {copy}/checkpoints/checkpoint-1 is")
    assert "adapter_model.safetensors differs from the saved file (checksum)" in message


def test_resume_needs_a_run_folder_and_the_same_config(world, cutoff):
    message = fails(world, "nothing-here", "train.resume=true")
    assert "holds no run to continue (no config.yaml)" in message and "hydra.run.dir=" in message
    copy = damaged(world, cutoff, "changed", lambda c: None)
    message = fails(world, "changed", "train.resume=true", "train.lr=1e-3")
    assert (
        "the config differs from the run in" in message and "train.lr: 0.0002 -> 0.001" in message
    )
    assert f"train.resume_from={copy / 'checkpoints'}" in message
    message = fails(world, "earlier", "train.resume=true")  # finished: nothing to resume
    assert "already finished (result.json)" in message


def test_a_new_run_never_writes_into_an_existing_run_folder(world):
    message = fails(world, "earlier")
    assert message.startswith(f"output_dir={world.earlier} already holds a run (config.yaml)")
    assert "add train.resume=true" in message


def test_resume_after_a_kill_during_a_save_continues_the_same_mlflow_run(world, cutoff):
    """The newest checkpoint was cut off mid-save: the run resumes from the one before and ends
    with the uninterrupted run's figures, in its own MLflow run."""
    out = world.tmp / "resumed"
    shutil.copytree(cutoff, out)  # with its mlflow_run_id: this copy continues the cut-off run
    run_id = (out / "mlflow_run_id").read_text()
    first = mlflow.MlflowClient(world.uri).get_run(run_id)
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()
    config = (out / "config.yaml").read_bytes()
    n_runs = len(world.runs())
    pipeline.run(world.cfg("resumed", "train.resume=true"))
    assert len(world.runs()) == n_runs  # continued, not duplicated
    run = mlflow.MlflowClient(world.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == "checkpoint-1"
    assert run.data.params == first.data.params  # nothing re-logged with another value
    for key in ("final_train_loss_avg", "final_train_steps"):
        assert run.data.metrics[key] == pytest.approx(first.data.metrics[key], rel=1e-5), key
    assert (out / "config.yaml").read_bytes() == config
    assert json.loads((out / "result.json").read_text())["state"] == "COMPLETE"
    assert (out / "checkpoints" / "checkpoint-2" / "checksums.json").is_file()  # saved again
    world.assert_intact(out, continued=run_id)
    world.record()  # the continued run is FINISHED now


# --- secrets: never in MLflow params, tags, run names, the saved config or log lines ----------------


def test_keys_from_the_environment_or_dotenv_are_masked(world, tmp_path, monkeypatch):
    import logging

    from summarizer import tracking

    from_env, from_dotenv = "tok-ENV-5d1e0a9f77", "sk-DOTENV-8b2c4e6a11"
    (tmp_path / ".env").write_text(f'export MY_API_KEY="{from_dotenv}"\nDATASET=dialogsum_ko\n')
    monkeypatch.chdir(tmp_path)  # the launch folder, where .env is read
    monkeypatch.setenv("SOME_SERVICE_TOKEN", from_env)
    tracking._secrets.cache_clear()
    try:
        # A key pasted into overrides (run name, a string setting) still never reaches MLflow.
        pipeline.run(
            world.cfg(
                "secrets",
                f"tracking.run_name=run-{from_dotenv}",
                f"augmentation.api.model=m-{from_env}",
            )
        )
        (run,) = [r for r in world.runs() if r.data.tags.get("output_dir", "").endswith("secrets")]
        logged = json.dumps([run.info.run_name, run.data.params, run.data.tags])
        assert from_env not in logged and from_dotenv not in logged
        assert (
            run.info.run_name == "run-***" and run.data.params["augmentation.api.model"] == "m-***"
        )
        assert run.data.params["data.name"] == "dialogsum_ko"  # other .env values are kept
        saved = (world.tmp / "secrets" / "config.yaml").read_text()
        assert from_env not in saved and from_dotenv not in saved and "m-***" in saved
        record = logging.LogRecord("x", logging.INFO, "", 0, "key %s", (from_env,), None)
        assert tracking.RedactSecrets().filter(record) and record.getMessage() == "key ***"
    finally:
        monkeypatch.undo()
        tracking._secrets.cache_clear()
    world.assert_intact()
