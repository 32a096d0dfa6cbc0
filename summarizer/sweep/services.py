"""The shared services of a sweep that spans several processes or machines: one PostgreSQL cluster
(two databases: `optuna` for the study, `mlflow` for MLflow's backend store) and one MLflow tracking
server that keeps artifacts in a local folder and serves them to every worker.

    python -m summarizer.sweep.services up   [--dir .services] [--host 127.0.0.1] [--pg-port 5433] ...
    python -m summarizer.sweep.services down [--dir .services]
    python -m summarizer.sweep.services env  [--dir .services]      # print the exports again

(`make services-up` / `make services-down`.) `up` prints the URLs to give the workers; the database
password stays out of them: workers export PGPASSWORD, which libpq (psycopg) reads, so it reaches no
command line, log or MLflow param. The servers keep running after `up` returns; `down` stops them
and keeps the data. The slow tests start the same services on free ports in a temporary folder.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user (created by
Debian's `postgresql` package) and its commands run through `runuser`.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from summarizer.errors import UserError

USER = "summarizer"  # the cluster's superuser; owns both databases
DATABASES = ("optuna", "mlflow")
PG_TOOLS = ("initdb", "pg_ctl", "postgres")


@dataclass
class Services:
    root: Path
    storage: str  # Optuna: hydra.sweeper.storage
    tracking: str  # MLflow: tracking.uri
    password: str  # export as PGPASSWORD for every worker and job


def pg_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: $PG_BIN, the PATH, or Debian's versioned folders
    (/usr/lib/postgresql/<version>/bin, newest first), which are not on the PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    if found := shutil.which("pg_ctl"):
        candidates.append(str(Path(found).resolve().parent))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += [str(p) for p in versions]
    for folder in filter(None, candidates):
        if all(os.access(Path(folder, tool), os.X_OK) for tool in PG_TOOLS):
            return Path(folder)
    return None


def _pg_bin() -> Path:
    folder = pg_bin_dir()
    if folder is None:
        raise UserError(
            "PostgreSQL server not found (initdb, pg_ctl, postgres): install it "
            "(Debian/Ubuntu: apt-get install postgresql) or set PG_BIN to its bin folder"
        )
    return folder


def _as_db_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL will not run as root: as root, run its commands as the `postgres` user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _db_owner_ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise UserError(
            "running as root, the PostgreSQL cluster needs a `postgres` user to own it (Debian's "
            "postgresql package creates one), or run make services-up as another user"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [
            f"exit code {proc.returncode}"
        ]
        raise UserError(f"{what} failed: {lines[-1]}")


def _connect_host(host: str) -> str:
    """Where this machine reaches a server listening on `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "*", "") else host


def advertised_host(host: str) -> str:
    """The address other machines use: `host`, or this machine's outgoing address when the servers
    listen on every interface (a UDP socket's connect picks the route; it sends nothing)."""
    if host not in ("0.0.0.0", "*", ""):
        return host
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))
        return s.getsockname()[0]
    return socket.gethostname()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _password(root: Path) -> str:
    """The database password: kept in <root>/pgpassword (0600), made on first use (or PGPASSWORD)."""
    path = root / "pgpassword"
    if path.is_file():
        return path.read_text().strip()
    password = os.environ.get("PGPASSWORD") or secrets.token_urlsafe(18)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def start_postgres(root: Path, host: str, port: int) -> str:
    """Start (creating on first use) the cluster in <root>/pg; return the password."""
    bin_dir = _pg_bin()
    root.mkdir(parents=True, exist_ok=True)
    password = _password(root)
    pg, data = root / "pg", root / "pg" / "data"
    owner = _db_owner_ids()
    pg.mkdir(exist_ok=True)
    if owner:
        os.chown(pg, *owner)
        reach = subprocess.run(_as_db_owner(["test", "-w", str(pg)]), capture_output=True)
        if reach.returncode != 0:
            raise UserError(
                f"user postgres cannot reach {pg} (PostgreSQL refuses to run as root, and a parent "
                "folder is private); pick a folder it can reach, e.g. SERVICES_DIR=/var/tmp/summarizer"
            )
    if not (data / "PG_VERSION").is_file():
        pwfile = pg / "pwfile"
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        if owner:
            os.chown(pwfile, *owner)
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-E", "UTF8"]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            _run(_as_db_owner(initdb), f"initdb {data}")
        finally:
            pwfile.unlink(missing_ok=True)
    if not _is_loopback(_connect_host(host)) or host in ("0.0.0.0", "*"):
        # initdb lets only this machine in; other machines log in with the password too.
        hba = data / "pg_hba.conf"
        rule = "host all all all scram-sha-256\n"
        if rule not in hba.read_text():
            with open(hba, "a") as f:
                f.write(rule)
    status = subprocess.run(
        _as_db_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "status"]), capture_output=True
    )
    if status.returncode != 0:  # not running yet
        _check_port_free(_connect_host(host), port, "PostgreSQL")
        listen = "*" if host in ("0.0.0.0", "*") else host
        # pg_ctl hands these to a shell: quoted, `*` stays a word and a path may hold spaces.
        options = f"-h {shlex.quote(listen)} -p {port} -k {shlex.quote(str(data))}"
        pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(pg / "server.log")]
        pg_ctl += ["-w", "-t", "60", "-o", options, "start"]
        _run(_as_db_owner(pg_ctl), f"PostgreSQL on port {port} (log: {pg / 'server.log'})")
    _create_databases(_connect_host(host), port, password)
    return password


def _create_databases(host: str, port: int, password: str) -> None:
    import psycopg

    with psycopg.connect(
        host=host, port=port, user=USER, password=password, dbname="postgres", autocommit=True
    ) as conn:
        for name in DATABASES:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')


def stop_postgres(root: Path) -> None:
    data = root / "pg" / "data"
    if not (data / "postmaster.pid").exists():
        return
    _run(
        _as_db_owner([str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
        f"stopping PostgreSQL in {data}",
    )


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket() as s:
        if s.connect_ex((host, port)) == 0:
            raise UserError(f"{what}: port {host}:{port} is already taken; pick another port")


def start_mlflow(
    root: Path, host: str, port: int, pg_port: int, password: str, allowed_hosts: str = ""
) -> None:
    """An MLflow tracking server over the `mlflow` database, artifacts in <root>/mlartifacts
    (served to the workers: they upload through the server, no shared folder needed)."""
    pid_file = root / "mlflow.pid"
    if pid_file.is_file() and pid_alive(int(pid_file.read_text())):
        return
    local = _connect_host(host)
    _check_port_free(local, port, "MLflow server")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"postgresql+psycopg://{USER}@{local}:{pg_port}/mlflow",
        "--artifacts-destination", str((root / "mlartifacts").resolve()),
        "--host", host, "--port", str(port),
        "--workers", "1",  # a sweep's logging is light; each worker costs a Python process
    ]  # fmt: skip
    if not allowed_hosts and host in ("0.0.0.0", "*"):
        # MLflow answers only Host headers it knows (DNS-rebinding guard; by default localhost and
        # private IPs): let in the address the workers are given, whatever network it is on.
        names = (advertised_host(host), "localhost", "127.0.0.1")
        allowed_hosts = ",".join(f"{n},{n}:{port}" for n in names)
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    log_path = root / "mlflow.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            cmd,
            # No MLflow server jobs (GenAI scorers, trace archival): two processes and a pool of
            # five that a sweep never uses.
            env={
                **os.environ,
                "PGPASSWORD": password,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            },
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `up`; `down` ends its process group
        )
    pid_file.write_text(str(proc.pid))
    deadline = time.time() + 180  # the first start creates MLflow's tables
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"MLflow server exited (log: {log_path}): {tail[0]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{local}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.5)
    raise UserError(f"MLflow server did not answer on {local}:{port} in 180 s (log: {log_path})")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host), ours or not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_mlflow(root: Path) -> None:
    pid_file = root / "mlflow.pid"
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text())
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # the server and its uvicorn workers
        deadline = time.time() + 5  # its store is a database: a kill loses nothing
        while pid_alive(pid) and time.time() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when `up` ran in this process (tests)
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink()


def urls(host: str, pg_port: int, mlflow_port: int) -> tuple[str, str]:
    where = advertised_host(host)
    return (
        f"postgresql+psycopg://{USER}@{where}:{pg_port}/optuna",
        f"http://{where}:{mlflow_port}",
    )


def up(
    root: Path,
    host: str = "127.0.0.1",
    pg_port: int = 5433,
    mlflow_port: int = 5050,
    allowed_hosts: str = "",
) -> Services:
    root = root.resolve()
    password = start_postgres(root, host, pg_port)
    try:
        start_mlflow(root, host, mlflow_port, pg_port, password, allowed_hosts)
    except BaseException:
        stop_postgres(root)
        raise
    storage, tracking = urls(host, pg_port, mlflow_port)
    env = (
        f"export PGPASSWORD=$(cat {root / 'pgpassword'})\n"
        f"export SWEEP_STORAGE={storage}\n"
        f"export TRACKING_URI={tracking}\n"
    )
    (root / "env").write_text(env)
    return Services(root, storage, tracking, password)


def down(root: Path) -> None:
    root = root.resolve()
    stop_mlflow(root)
    stop_postgres(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m summarizer.sweep.services", description=__doc__.split("\n")[0]
    )
    p.add_argument("action", choices=["up", "down", "env"])
    p.add_argument("--dir", type=Path, default=Path(".services"), help="data, logs, password")
    p.add_argument("--host", default="127.0.0.1", help="listen address; 0.0.0.0 for other machines")
    p.add_argument("--pg-port", type=int, default=5433)
    p.add_argument("--mlflow-port", type=int, default=5050)
    p.add_argument("--allowed-hosts", default="", help="MLflow --allowed-hosts (host names)")
    args = p.parse_args(argv)
    try:
        if args.action == "down":
            down(args.dir)
            print(f"services in {args.dir} stopped (data kept)")
            return 0
        if args.action == "up":
            s = up(args.dir, args.host, args.pg_port, args.mlflow_port, args.allowed_hosts)
            print(
                f"PostgreSQL and the MLflow server are up (data, logs: {s.root}); for every worker:"
            )
        env_file = args.dir.resolve() / "env"
        if not env_file.is_file():
            raise UserError(f"no services in {args.dir}: run make services-up first")
        print(env_file.read_text(), end="")
        print(
            "python -m summarizer --multirun sweep=tiny_cpu "
            "hydra.sweeper.storage=$SWEEP_STORAGE tracking.uri=$TRACKING_URI"
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
