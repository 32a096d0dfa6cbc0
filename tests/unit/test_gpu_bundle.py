"""The offline GPU path without a GPU or network: scripts/gpu/bundle.py (split, manifest, join),
bundle.sh and setup.sh around it, wheelhouse.sh's pip command (pip replaced by a recorder) and the
Makefile's GPU install switch."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "scripts" / "gpu"

spec = importlib.util.spec_from_file_location("gpu_bundle", GPU / "bundle.py")
bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bundle)


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "wheelhouse").mkdir(parents=True)
    (src / "wheelhouse" / "a-1.0-py3-none-any.whl").write_bytes(os.urandom(5000))
    (src / "wheelhouse" / "b-2.0-py3-none-any.whl").write_bytes(b"b" * 3000)
    (src / "model" / "blobs").mkdir(parents=True)
    (src / "model" / "blobs" / "w").write_bytes(os.urandom(2000))
    (src / "model" / "config.json").symlink_to("blobs/w")  # as the HF hub cache links its files
    (src / "dev.csv").write_text("fname,dialogue,summary\n1,안녕,인사\n")
    return src


def _pack(tmp_path: Path, piece: int = 1024) -> tuple[Path, Path, list]:
    src = _tree(tmp_path)
    out = tmp_path / "bundle"
    items = [
        ("wheelhouse", src / "wheelhouse"),
        ("data/dev.csv", src / "dev.csv"),
        ("models/m", src / "model"),
    ]
    pieces = bundle.pack(out, piece, items, {"python": "3.11", "platform": "x"})
    return src, out, pieces


@pytest.mark.parametrize(
    "text, size",
    [("2G", 2 * 1024**3), ("512M", 512 * 1024**2), ("64MiB", 64 * 1024**2), ("100k", 102400)]
    + [("4096", 4096)],
)
def test_piece_size(text, size):
    assert bundle.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "2X", "-1M", "1.5G"])
def test_piece_size_rejects(text):
    with pytest.raises(Exception, match="piece size"):
        bundle.parse_size(text)


def test_split_verify_join(tmp_path):
    src, out, pieces = _pack(tmp_path)
    files = sorted(out.glob("bundle.tar.*"))
    assert [p.name for p in files] == [name for name, *_ in pieces]
    assert len(files) > 5 and all(p.stat().st_size <= 1024 for p in files)
    manifest = (out / "MANIFEST.sha256").read_text().splitlines()
    assert manifest == [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}" for p in files]
    assert bundle.verify(out) == files

    info = bundle.unpack(out, tmp_path / "un")
    un = tmp_path / "un"
    assert info["python"] == "3.11"
    assert info["contents"] == ["wheelhouse", "data/dev.csv", "models/m"]
    for name in ("a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"):
        assert (un / "wheelhouse" / name).read_bytes() == (src / "wheelhouse" / name).read_bytes()
    assert (un / "data" / "dev.csv").read_text() == (src / "dev.csv").read_text()
    assert (un / "models" / "m" / "config.json").is_symlink()
    assert (un / "models" / "m" / "config.json").read_bytes() == (
        src / "model/blobs/w"
    ).read_bytes()


def test_pieces_are_a_plain_split_tar(tmp_path):
    """What docs/gpu.md gives as the by-hand path: sha256sum -c, then cat | tar -x."""
    if not (shutil.which("sha256sum") and shutil.which("tar")):
        pytest.skip("coreutils sha256sum / tar not here")
    src, out, _ = _pack(tmp_path)
    subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=out, check=True)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(f"cat {out}/bundle.tar.* | tar -x -C {dest}", shell=True, check=True)
    assert (dest / "data" / "dev.csv").read_text() == (src / "dev.csv").read_text()


def test_one_piece_when_it_fits(tmp_path):
    _, out, pieces = _pack(tmp_path, piece=bundle.parse_size("2G"))
    assert len(pieces) == 1 and (out / "bundle.tar.000").is_file()


def test_repack_replaces_old_pieces(tmp_path):
    _, out, first = _pack(tmp_path, piece=512)
    (tmp_path / "src").rename(tmp_path / "old")
    _, _, second = _pack(tmp_path, piece=4096)
    assert len(second) < len(first)
    assert len(list(out.glob("bundle.tar.*"))) == len(second)


def test_unpack_twice(tmp_path):
    """setup.sh run again: the same pieces are not read again; new ones replace the files."""
    _, out, _ = _pack(tmp_path)
    dest = tmp_path / "un"
    bundle.unpack(out, dest)
    (dest / "data" / "dev.csv").write_text("edited")
    bundle.unpack(out, dest)
    assert (dest / "data" / "dev.csv").read_text() == "edited"
    (tmp_path / "src" / "dev.csv").write_text("new rows\n")
    bundle.pack(out, 1024, [("data/dev.csv", tmp_path / "src" / "dev.csv")], {})
    bundle.unpack(out, dest)
    assert (dest / "data" / "dev.csv").read_text() == "new rows\n"
    assert (dest / "models" / "m" / "config.json").is_symlink()  # the earlier files stay


def test_corrupt_piece(tmp_path):
    _, out, _ = _pack(tmp_path)
    piece = out / "bundle.tar.002"
    data = bytearray(piece.read_bytes())
    data[10] ^= 0xFF
    piece.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"checksum mismatch.*bundle.tar.002"):
        bundle.unpack(out, tmp_path / "un")
    assert not (tmp_path / "un").exists()  # checked before anything is written


def test_missing_piece_and_manifest(tmp_path):
    _, out, _ = _pack(tmp_path)
    (out / "bundle.tar.001").unlink()
    with pytest.raises(SystemExit, match=r"missing pieces.*bundle.tar.001"):
        bundle.verify(out)
    (out / "MANIFEST.sha256").unlink()
    with pytest.raises(SystemExit, match="MANIFEST.sha256: not found"):
        bundle.verify(out)


def test_pack_refuses_clashes_and_missing_paths(tmp_path):
    src = _tree(tmp_path)
    with pytest.raises(SystemExit, match="two entries"):
        bundle.pack(tmp_path / "b", 1024, [("data/x", src / "dev.csv")] * 2, {})
    with pytest.raises(SystemExit, match="no such file"):
        bundle.pack(tmp_path / "b", 1024, [("data/x", tmp_path / "nope")], {})
    with pytest.raises(Exception, match="DEST=PATH"):
        bundle._item("../up=/etc")


def _fake_wheelhouse(tmp_path: Path) -> Path:
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    (wh / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"t" * 3000)
    version = "{}.{}".format(*sys.version_info[:2])
    (wh / "TARGET").write_text(f"PYTHON={version}\nPLATFORM=manylinux_2_28_x86_64\n")
    return wh


def _run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(GPU / script), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bundle_sh_then_setup_sh(tmp_path):
    """make bundle's script on a small PIECE_SIZE, then setup.sh with pip replaced by a recorder."""
    wh = _fake_wheelhouse(tmp_path)
    data = tmp_path / "dev.csv"
    data.write_text("fname,dialogue,summary\n")
    out = tmp_path / "bundle"
    env = {
        "PY": sys.executable,
        "WHEELHOUSE": str(wh),
        "BUNDLE": str(out),
        "PIECE_SIZE": "1K",
        "DATA": str(data),
        "MODELS": "",
    }
    r = _run("bundle.sh", env)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("bundle.tar.*"))) >= 3

    # A model copy as make bundle adds it (MODELS=gemma3_270m converts a real one: too slow here).
    extra = tmp_path / "m"
    (extra / "gemma3_270m-abc").mkdir(parents=True)
    (extra / "gemma3_270m-abc" / "config.json").write_text("{}")
    bundle.pack(
        out,
        1024,
        [
            ("wheelhouse", wh),
            ("data/dev.csv", data),
            ("models/gemma3_270m-abc", extra / "gemma3_270m-abc"),
        ],
        {"python": "{}.{}".format(*sys.version_info[:2])},
    )

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    stub = venv / "bin" / "python"
    stub.write_text(f'#!/bin/bash\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    cache = tmp_path / "cache"
    env = {
        "PYTHON_BIN": sys.executable,
        "VENV": str(venv),
        "SUMMARIZER_CACHE": str(cache),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
    }
    r = _run("setup.sh", env, str(out), "--", "true")
    assert r.returncode == 0, r.stderr
    calls = [line for line in log.read_text().splitlines() if line.startswith("-m pip")]
    assert len(calls) == 4 and all(
        f"--no-index --find-links {out}/unpacked/wheelhouse" in c for c in calls
    )
    assert "-r requirements.txt -r scripts/gpu/requirements-gpu.txt" in calls[1]
    assert calls[2].endswith("--no-deps -r requirements-nodeps.txt")
    assert calls[3].endswith("--no-deps -e .")
    assert (cache / "models" / "gemma3_270m-abc" / "config.json").is_file()
    assert (out / "unpacked" / "data" / "dev.csv").is_file()
    stamps = sorted(p.name for p in venv.glob(".installed-*"))
    assert stamps == sorted(_make_stamps(venv))


def test_setup_sh_refuses_other_python(tmp_path):
    wh = _fake_wheelhouse(tmp_path)
    (wh / "TARGET").write_text("PYTHON=3.2\n")
    r = _run("setup.sh", {"PYTHON_BIN": sys.executable, "VENV": str(tmp_path / "v")}, str(wh))
    assert r.returncode == 2 and "the wheels are for Python 3.2" in r.stderr


def _recorder(tmp_path: Path, torch_name: str) -> tuple[Path, Path]:
    """A PY whose `-m pip` logs its arguments and drops a torch wheel into `download -d`."""
    log = tmp_path / "pip.log"
    py = tmp_path / "py"
    py.write_text(
        "#!/bin/bash\n"
        f'echo "$@" >> {log}\n'
        'if [ "$3" = download ]; then\n'
        '  while [ $# -gt 0 ]; do [ "$1" = -d ] && d=$2; shift; done\n'
        f'  touch "$d/{torch_name}"\n'
        "fi\n"
    )
    py.chmod(0o755)
    return py, log


def test_wheelhouse_sh_command(tmp_path):
    py, log = _recorder(tmp_path, "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    wh = tmp_path / "wh"
    env = {"PY": str(py), "WHEELHOUSE": str(wh), "PYTHON": "3.12", "LOCK": "none"}
    env["PLATFORM"] = "manylinux_2_28_x86_64"
    r = _run("wheelhouse.sh", env)
    assert r.returncode == 0, r.stderr
    wheel, download, nodeps = log.read_text().splitlines()
    assert wheel.startswith("-m pip wheel") and "rouge_score==0.1.2" in wheel
    assert "--only-binary=:all:" in download and "-r requirements.txt" in download
    assert "-r scripts/gpu/requirements-gpu.txt" in download and " -c " not in download
    tags = download.split()
    platforms = [tags[i + 1] for i, t in enumerate(tags) if t == "--platform"]
    assert platforms[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(platforms)
    assert "--python-version 3.12" in download and "--abi cp312" in download
    assert nodeps.startswith("-m pip download") and "--no-deps" in nodeps
    assert "-r requirements-nodeps.txt" in nodeps
    assert (wh / "TARGET").read_text() == "PYTHON=3.12\nPLATFORM=manylinux_2_28_x86_64\n"


def test_wheelhouse_sh_rejects_cpu_torch(tmp_path):
    py, _ = _recorder(tmp_path, "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    env = {"PY": str(py), "WHEELHOUSE": str(tmp_path / "wh"), "LOCK": "none"}
    r = _run("wheelhouse.sh", env)
    assert r.returncode == 1 and "CPU-only build" in r.stderr
    r = _run("wheelhouse.sh", {**env, "ALLOW_CPU_TORCH": "1"})
    assert r.returncode == 0, r.stderr
    r = _run("wheelhouse.sh", {**env, "PYTHON": "/usr/bin/python3"})
    assert r.returncode == 2 and "expected a version like 3.11" in r.stderr


def _make_stamps(venv: Path, gpu: str = "1") -> list[str]:
    """The stamp files `make install` would touch, read from `make -n`."""
    if not shutil.which("make"):
        pytest.skip("no make")
    r = subprocess.run(
        ["make", "-n", "-B", "install", f"VENV={venv}", f"GPU={gpu}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [w.rsplit("/", 1)[1] for w in r.stdout.split() if "/.installed-" in w and "*" not in w]


def test_make_install_gpu_switch(tmp_path):
    gpu = _make_stamps(tmp_path / "v", "1")
    cpu = _make_stamps(tmp_path / "v", "0")
    assert len(cpu) == 1 and cpu[0].startswith(".installed-")
    assert gpu[0] == cpu[0] and len(gpu) == 2 and gpu[1].startswith(".installed-gpu-")
