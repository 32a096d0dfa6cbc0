#!/usr/bin/env python3
"""Pack files for a machine without network into checksummed pieces, and unpack them there.

    python3 scripts/gpu/bundle.py pack bundle --piece-size 2G wheelhouse=wheelhouse data/dev.csv=/path/to/dev.csv
    python3 scripts/gpu/bundle.py verify bundle
    python3 scripts/gpu/bundle.py unpack bundle --to bundle/unpacked

`pack` streams one tar of every DEST=PATH (a file or a folder, unpacked at DEST) into
bundle.tar.000, bundle.tar.001 ... of at most --piece-size bytes each (pieces fit whatever the
copy goes through: a file-size limit, a USB stick, an upload), and writes MANIFEST.sha256 beside
them. Without this script the same is `sha256sum -c MANIFEST.sha256 && cat bundle.tar.* | tar -x`.
Standard library only: it runs on the GPU machine before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import sys
import tarfile
import time
from pathlib import Path

MANIFEST = "MANIFEST.sha256"
PREFIX = "bundle.tar."
INFO = "bundle.json"  # inside the tar: what was packed, for which Python
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """'2G', '512M', '64MiB', '100k' or a byte count."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"piece size {text!r}: expected e.g. 2G, 512M or a byte count"
        )
    return int(m.group(1)) * UNITS[m.group(2).upper()]


class PieceWriter:
    """A write-only file that rolls over to a new piece every `size` bytes, hashing as it goes."""

    def __init__(self, out: Path, size: int):
        self.out, self.size = out, size
        self.pieces: list[tuple[str, str, int]] = []  # name, sha256, bytes
        self._file = None
        self._hash = None
        self._left = 0

    def _next(self) -> None:
        self._close_piece()
        name = f"{PREFIX}{len(self.pieces):03d}"
        self._file = open(self.out / name, "wb")  # closed at the next roll-over
        self._hash, self._left, self._name, self._bytes = hashlib.sha256(), self.size, name, 0

    def _close_piece(self) -> None:
        if self._file is not None:
            self._file.close()
            self.pieces.append((self._name, self._hash.hexdigest(), self._bytes))
            self._file = None

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self._left == 0:
                self._next()
            chunk = view[: self._left]
            self._file.write(chunk)
            self._hash.update(chunk)
            self._left -= len(chunk)
            self._bytes += len(chunk)
            view = view[len(chunk) :]
        return len(data)

    def close(self) -> None:
        self._close_piece()


class PieceReader:
    """The pieces read back as one stream."""

    def __init__(self, paths: list[Path]):
        self._paths = list(paths)
        self._file = None

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self._file is None:
                if not self._paths:
                    break
                self._file = open(self._paths.pop(0), "rb")
            chunk = self._file.read(-1 if n < 0 else n - len(out))
            if not chunk:
                self._file.close()
                self._file = None
                continue
            out += chunk
        return bytes(out)


def pack(out: Path, piece_size: int, items: list[tuple[str, Path]], info: dict) -> list[tuple]:
    dests = [name for name, _ in items]
    for name, path in items:
        if not path.exists():
            raise SystemExit(f"error: {name}={path}: no such file or folder")
        if dests.count(name) > 1 or any(d.startswith(name + "/") for d in dests):
            raise SystemExit(f"error: {name}: two entries would unpack there")
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob(PREFIX + "*"), out / MANIFEST]:  # a rerun replaces the bundle whole
        old.unlink(missing_ok=True)
    info = {**info, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "contents": dests}
    writer = PieceWriter(out, piece_size)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        blob = json.dumps(info, indent=1).encode()
        entry = tarfile.TarInfo(INFO)
        entry.size, entry.mtime = len(blob), int(time.time())
        tar.addfile(entry, _Bytes(blob))
        for name, path in items:
            tar.add(str(path), arcname=name, filter=_plain)
    writer.close()
    lines = [f"{sha}  {name}\n" for name, sha, _ in writer.pieces]
    (out / MANIFEST).write_text("".join(lines))
    return writer.pieces


class _Bytes:
    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return chunk


def _plain(entry: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """No owner names or ids from this machine; sockets and devices left out."""
    if not (entry.isfile() or entry.isdir() or entry.issym()):
        return None
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    return entry


def verify(bundle: Path) -> list[Path]:
    """Every piece the manifest lists, present and with its checksum; the paths in order."""
    manifest = bundle / MANIFEST
    if not manifest.is_file():
        raise SystemExit(f"error: {manifest}: not found (copy it with the pieces)")
    listed = []
    for line in manifest.read_text().splitlines():
        if line.strip():
            sha, name = line.split(maxsplit=1)
            listed.append((name.lstrip("*"), sha))
    if not listed:
        raise SystemExit(f"error: {manifest} lists no pieces")
    missing = [name for name, _ in listed if not (bundle / name).is_file()]
    if missing:
        raise SystemExit(f"error: missing pieces in {bundle}: {', '.join(missing)}")
    bad = [name for name, sha in listed if _sha256(bundle / name) != sha]
    if bad:
        raise SystemExit(f"error: checksum mismatch (copy again): {', '.join(bad)}")
    extra = sorted({p.name for p in bundle.glob(PREFIX + "*")} - {n for n, _ in listed})
    if extra:
        print(f"warning: not in {MANIFEST}, ignored: {', '.join(extra)}", file=sys.stderr)
    return [bundle / name for name, _ in listed]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def unpack(bundle: Path, dest: Path) -> dict:
    info_path, done = dest / INFO, dest / ".manifest"
    manifest = (bundle / MANIFEST).read_text() if (bundle / MANIFEST).is_file() else None
    if manifest and done.is_file() and done.read_text() == manifest and info_path.is_file():
        print(f"{dest}: already unpacked from these pieces")  # a rerun of setup.sh
        return json.loads(info_path.read_text())
    pieces = verify(bundle)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=PieceReader(pieces), mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of dest
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    done.write_text(manifest)
    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def _item(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    name = name.strip("/")
    if not sep or not name or ".." in name.split("/") or name == INFO:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected DEST=PATH (e.g. data/dev.csv=/path/to/dev.csv)"
        )
    return name, Path(path).expanduser()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="DEST=PATH ... into checksummed pieces")
    p.add_argument("bundle", type=Path)
    p.add_argument("items", nargs="+", type=_item, metavar="DEST=PATH")
    p.add_argument("--piece-size", type=parse_size, default=parse_size("2G"))
    p.add_argument("--python", default="", help="the Python the wheels are for (recorded)")
    p.add_argument("--platform", default="", help="the platform the wheels are for (recorded)")
    v = sub.add_parser("verify", help="check every piece against the manifest")
    v.add_argument("bundle", type=Path)
    u = sub.add_parser("unpack", help="verify, join and extract")
    u.add_argument("bundle", type=Path)
    u.add_argument("--to", type=Path, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "pack":
        info = {"python": args.python, "platform": args.platform}
        pieces = pack(args.bundle, args.piece_size, args.items, info)
        total = sum(size for *_, size in pieces)
        print(f"{args.bundle}: {total / 1024**2:.1f} MiB in {len(pieces)} piece(s) + {MANIFEST}")
    elif args.cmd == "verify":
        print(f"{args.bundle}: {len(verify(args.bundle))} piece(s) OK")
    else:
        info = unpack(args.bundle, args.to)
        print(f"{args.to}: {', '.join(info.get('contents', []))}")
        want, have = info.get("python"), "{}.{}".format(*platform.python_version_tuple()[:2])
        if want and want != have:
            print(f"warning: the wheels are for Python {want}, this is {have}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
