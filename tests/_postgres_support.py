"""A real PostgreSQL server for the tests: ``initdb`` into a temporary directory, ``pg_ctl
start`` on a free loopback port (socket in that directory), one fresh database per test.

The binaries come from ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin
(Debian's ``postgresql-15`` package), else PATH. PostgreSQL refuses to run as root, so as
root the server runs as ``nobody`` (``runuser``, else ``setpriv``) in a directory given to
it. fsync is off: these tests check what a commit means to other sessions, not disks.
Test databases use ICU's en-US collation where the server has ICU, so a query that relied
on the database's text order (instead of the store's bytewise ``COLLATE "C"``) would show.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: The superuser initdb creates; the tests connect as it (trust authentication, loopback).
USER = "reidal"


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are, or None."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: _version(p.parent.name), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for d in candidates:
        if all((d / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway cluster; :meth:`database` hands out fresh databases."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = 0
        self._as_user: list[str] = []
        self._base = Path(tempfile.mkdtemp(prefix="reidal-pg-"))
        self._names = itertools.count()
        self._icu = False
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self._base, nobody.pw_uid, nobody.pw_gid)
            if shutil.which("runuser"):
                self._as_user = ["runuser", "-u", "nobody", "--"]
            else:
                self._as_user = ["setpriv", f"--reuid={nobody.pw_uid}",
                                 f"--regid={nobody.pw_gid}", "--clear-groups", "--"]

    @property
    def data(self) -> Path:
        return self._base / "data"

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run([*self._as_user, str(self.bindir / args[0]), *args[1:]],
                              cwd=self._base, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self._base / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr}{tail}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        for attempt in range(3):  # a free port may be taken before the server binds it
            self.port = _free_port()
            options = (f"-p {self.port} -k {self._base} -c listen_addresses=127.0.0.1"
                       " -c fsync=off -c full_page_writes=off -c max_connections=200")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self._base / "server.log"),
                          "-w", "-t", "30", "-s", "-o", options, "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        with self._admin() as conn:
            self._icu = bool(conn.execute(
                "SELECT 1 FROM pg_collation WHERE collprovider = 'i' LIMIT 1").fetchone())

    def restart(self) -> None:
        """Restart the server (fast: sessions end), same port and data."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self._base / "server.log"),
                  "-w", "-t", "30", "-s", "-m", "fast", "restart")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-s", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self._base, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def _admin(self) -> Iterator:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            yield conn

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database (dropped afterwards, open sessions and all)."""
        name = f"t{os.getpid()}_{next(self._names)}"
        collation = (" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"
                     if self._icu else "")
        with self._admin() as conn:
            conn.execute(f"CREATE DATABASE {name}{collation}")
        try:
            yield self.url(name)
        finally:
            with self._admin() as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_postgres() -> PostgresServer:
    """A running server, or pytest.skip with the reason there can be none."""
    import pytest

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install "
                    "Debian's postgresql-15 package (or put initdb on PATH)")
    if os.geteuid() == 0 and not (shutil.which("runuser") or shutil.which("setpriv")):
        pytest.skip("running as root without runuser or setpriv: PostgreSQL refuses root")
    server = PostgresServer(bindir)
    tic = time.perf_counter()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.perf_counter() - tic  # type: ignore[attr-defined]
    return server
