"""Start and stop the Triton server bundled in nvidia-pytriton, for laptops, CI and tests.

The binary (``pytriton/tritonserver/bin/tritonserver``, Triton 2.51) runs on a plain model
repository (see :mod:`reidal.embedding.triton_repo`) with the python backend; the GPU
deployment runs the NGC image instead and needs none of this. What this module takes care of
(each point measured on this project's machines, see the project brief's shared/docs/triton-on-cpu.md):

* The python backend wants ``libtriton_python.so`` and the stub for *this* interpreter's
  Python version in one folder; the wheel keeps the stubs apart, so a backend folder is
  made in the server's work directory: symlinks, and a copy of the stub (the backend
  chmods it, which a non-root server cannot do to a root-owned file in an image).
* The stub links ``libpython3.11.so.1.0``: ``LD_LIBRARY_PATH`` starts with this interpreter's
  ``LIBDIR`` so a system copy of another patch release is not picked up (pitfall 1). The
  interpreter's folder leads ``PATH`` so the stub finds the same virtualenv.
* Explicit model control (``--model-control-mode=explicit``): the models named are loaded at
  start, and training later loads new versions with :meth:`TritonServer.load_model`.
* Readiness is polled over HTTP, not over a gRPC channel, whose reconnect back-off adds
  seconds while the server starts (pitfall 8). If the process dies first, the error carries
  the tail of its log.
* Each server gets its own free ports (pitfall 4) and its own python-backend shared-memory
  prefix, so several servers (tests, other helpers) can run side by side.
* A server that dies on its own (killed, crashed) is started again on the same ports by
  :meth:`TritonServer.restart_if_dead`, loading the models it was started with and those
  :meth:`TritonServer.load_model` loaded since, ready before it returns; its dead process
  is reaped, its python stubs and their shared-memory regions removed.
  :class:`reidal.triton_supervisor.TritonSupervisor` calls it, with backoff.
* No orphans: stop sends SIGTERM, then SIGKILL after a grace period, and also kills the
  python-backend stubs it recorded; an ``atexit`` hook stops every server still running, and
  on Linux the server gets SIGTERM if the Python thread that started it dies (``PR_SET_PDEATHSIG``,
  only when started from the main thread or a supervisor's thread, since the signal follows
  the starting *thread*).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Collection, Sequence
from pathlib import Path

from reidal.embedding.spec import DEFAULT_MODEL_NAME
from reidal.embedding.triton_versions import load_versions

#: Seconds allowed for the server and its models to become ready.
DEFAULT_STARTUP_TIMEOUT_S = 120.0
#: Seconds between SIGTERM and SIGKILL.
DEFAULT_STOP_GRACE_S = 15.0
LOG_FILE = "tritonserver.log"


class TritonStartError(RuntimeError):
    """The Triton server did not become ready; the message holds the end of its log."""


def pytriton_dir() -> Path:
    """The ``tritonserver`` folder shipped inside the nvidia-pytriton wheel."""
    import pytriton

    path = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (path / "bin" / "tritonserver").exists():
        raise TritonStartError(f"no tritonserver binary under {path}: is nvidia-pytriton installed?")
    return path


def _libs_dir() -> Path:
    # Shared libraries auditwheel moved out of the wheel's binaries (next to the package).
    return pytriton_dir().parent.parent / "nvidia_pytriton.libs"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_LIVE: weakref.WeakSet[TritonServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A tritonserver process serving ``model_repository`` with explicit model control.

    Ports left as ``None`` are picked free at the first :meth:`start` and then kept, so a
    :meth:`restart` comes back on the same URLs (clients reconnect without being rebuilt).
    ``workdir`` holds the log and the backend folder (a temporary folder, removed at
    :meth:`stop`, when not given). ``models`` are loaded at start (``"*"``: every model).
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        models: Sequence[str] = (DEFAULT_MODEL_NAME,),
        workdir: str | Path | None = None,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        stop_grace_s: float = DEFAULT_STOP_GRACE_S,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise ValueError(f"model repository {self.model_repository} is not a directory")
        if isinstance(models, str):
            raise ValueError("models must be a sequence of model names, not one string")
        self.models = tuple(models)
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self._given_ports = (grpc_port, http_port, metrics_port)
        self._auto_ports = None in self._given_ports
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.extra_args = tuple(extra_args)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._children: list[object] = []
        self._lock = threading.RLock()
        self._wanted = False  # started and not stopped since: a death is to be repaired
        self._stopping = threading.Event()  # stop() called: a start in progress gives up
        # Models load_model loaded since start, in order: a restart loads them too.
        self._loaded: list[str] = []
        self._shm_prefix = ""  # the python backend's shared-memory names of this launch

    # ----------------------------------------------------------------- addresses
    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc``."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` for ``tritonclient.http`` (prefix ``http://`` for plain HTTP tools)."""
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self.workdir / LOG_FILE if self.workdir is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process lives; asking reaps it once it has died."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def died(self) -> bool:
        """Started, never stopped, and not running: it died on its own (the dead process
        is reaped by asking, so none is left a zombie)."""
        return self._wanted and not self._stopping.is_set() and not self.running

    @property
    def returncode(self) -> int | None:
        """The exit status of the process that ended (negative: killed by that signal)."""
        return self._proc.returncode if self._proc is not None else None

    @property
    def startup_models(self) -> tuple[str, ...]:
        """What a (re)start loads and waits for: ``models``, then the models
        :meth:`load_model` loaded since the first start (as their repository configs say,
        which is what a load by name did)."""
        return tuple(dict.fromkeys([*self.models, *self._loaded]))

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> TritonServer:
        """Start the server and wait until it and every model in ``models`` is ready."""
        self._stopping.clear()
        with self._lock:
            if self.running:
                return self
            self._start(keep_ports=False,
                        pdeathsig=threading.current_thread() is threading.main_thread())
            self._wanted = True
            self._loaded.clear()
            return self

    def restart_if_dead(self, *, pdeathsig: bool = False) -> bool:
        """Start the server again on the same ports if it :attr:`died` (the process is
        reaped, its python stubs killed first) and wait until every model of
        :attr:`startup_models` is ready; True when it was restarted. Raises
        TritonStartError when it does not come back (the next call tries again).
        ``pdeathsig``: the calling thread lives as long as the server should (a
        supervisor's), so the new process may end with it."""
        with self._lock:
            if not self.died:
                return False
            self._kill()
            self._start(keep_ports=True, pdeathsig=pdeathsig)
            return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_grace_s``; also ends the recorded python stubs.
        A restart in progress gives up first."""
        self._stopping.set()
        with self._lock:
            self._wanted = False
            proc = self._proc
            if proc is None:
                return
            self._record_children()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_grace_s)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
            if self._own_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def restart(self) -> TritonServer:
        """Stop and start again on the same ports."""
        self.stop()
        return self.start()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- model control
    def load_model(self, name: str, *, timeout_s: float = 300.0) -> None:
        """Ask Triton to (re)load ``name`` from the repository: new version folders are
        picked up, removed ones unloaded. Blocks until loaded; raises RuntimeError on failure.
        A restart loads it again (:attr:`startup_models`)."""
        self._control("load_model", name, timeout_s)
        self._record_children()  # the model's python stub, to be killed with the server
        if name not in self._loaded:
            self._loaded.append(name)

    def load_versions(self, name: str, versions: Collection[str], *, keep_ready: bool = False,
                      timeout_s: float = 300.0) -> set[str]:
        """Have Triton serve exactly ``versions`` of ``name`` (and every version ready now
        when ``keep_ready``), its config read from this server's repository
        (:func:`reidal.embedding.triton_versions.load_versions`); the new python stubs are
        recorded, to be killed with the server. Returns the versions ready after."""
        import tritonclient.grpc as grpcclient

        if not self.running:
            raise RuntimeError(f"Triton at {self.grpc_url} is not running")
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            ready = load_versions(client, name, versions, keep_ready=keep_ready,
                                  repository=self.model_repository, timeout_s=timeout_s)
        finally:
            client.close()
        self._record_children()
        if name not in self._loaded:
            self._loaded.append(name)
        return ready

    def unload_model(self, name: str, *, timeout_s: float = 60.0) -> None:
        """Unload every version of ``name`` and wait until it no longer answers ready."""
        self._control("unload_model", name, timeout_s)
        if name in self._loaded:
            self._loaded.remove(name)
        deadline = time.monotonic() + timeout_s
        while self._http_ok(f"/v2/models/{name}/ready") and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # ----------------------------------------------------------------- internals
    def _ports(self) -> tuple[int | None, int | None, int | None]:
        return (self.grpc_port, self.http_port, self.metrics_port)

    def _start(self, *, keep_ports: bool, pdeathsig: bool) -> None:
        """Launch and wait until ready (under the lock). Ports picked free may be picked
        again when taken (3 tries), unless ``keep_ports``: a restart must come back where
        its clients are."""
        attempts = 3 if self._auto_ports and not keep_ports else 1
        for attempt in range(attempts):
            if self._auto_ports and (attempt > 0 or None in self._ports()):
                picked = iter(free_ports(3, self.host))
                self.grpc_port, self.http_port, self.metrics_port = (
                    given if given is not None else next(picked) for given in self._given_ports
                )
            try:
                self._launch(pdeathsig)
                self._wait_ready()
                self._record_children()
                return
            except TritonStartError as exc:
                in_use = "address already in use" in str(exc).lower()
                self._kill()
                if not (in_use and attempt + 1 < attempts):
                    raise
        raise AssertionError("unreachable")

    def _control(self, action: str, name: str, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if not self.running:
            raise RuntimeError(f"Triton at {self.grpc_url} is not running")
        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            getattr(client, action)(name, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise RuntimeError(
                f"Triton could not {action.replace('_', ' ')} {name!r}: {exc.message()}\n"
                f"--- end of {self.log_path} ---\n{self.log_tail(15)}"
            ) from None
        finally:
            client.close()

    def _prepare_workdir(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="reidal-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        dist = pytriton_dir()
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonStartError(f"nvidia-pytriton has no python-backend stub for Python {version}")
        links = {
            "libtriton_python.so": dist / "backends" / "python" / "libtriton_python.so",
            "triton_python_backend_utils.py": dist / "backends" / "python"
            / "triton_python_backend_utils.py",
        }
        for name, target in links.items():
            link = backend / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
        # The stub is copied, not linked: the python backend chmods it before every start,
        # which fails (and no model loads) when it belongs to root on a read-only image
        # and the server runs as its own user, as in the container image.
        copy = backend / "triton_python_backend_stub"
        if copy.is_symlink() or copy.exists():
            copy.unlink()
        shutil.copyfile(stub, copy)
        copy.chmod(0o755)
        return self.workdir

    def _command(self, workdir: Path) -> list[str]:
        cmd = [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={workdir / 'backends'}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.startup_models),
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--exit-timeout-secs=5",
            "--log-info=true",
            # Own shared-memory names, so servers side by side never share a region.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self.extra_args,
        ]
        return cmd

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        ld = [p for p in (libdir, str(_libs_dir()), env.get("LD_LIBRARY_PATH", "")) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
        # The stub embeds libpython and finds its prefix through PATH: with this interpreter's
        # folder first it runs in the same virtualenv (site-packages, editable installs).
        # It ignores PYTHON* variables (measured: PYTHONDONTWRITEBYTECODE has no effect).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        return env

    def _launch(self, pdeathsig: bool) -> None:
        if self._stopping.is_set():
            raise TritonStartError("stopped while starting")
        workdir = self._prepare_workdir()
        self._shm_prefix = f"reidal_{uuid.uuid4().hex[:12]}_"
        log = open(workdir / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                self._command(workdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=workdir,
                start_new_session=True,
                preexec_fn=_set_pdeathsig if pdeathsig else None,
            )
        finally:
            log.close()
        _LIVE.add(self)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        pending = ["/v2/health/ready",
                   *(f"/v2/models/{m}/ready" for m in self.startup_models if m != "*")]
        while pending:
            if self._stopping.is_set():
                raise TritonStartError("stopped while starting")
            code = self._proc.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {code} before it was ready "
                    f"(grpc {self.grpc_url}, http {self.http_url}); end of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver was not ready after {self.startup_timeout_s:.0f} s "
                    f"(still waiting for {pending[0]}); end of {self.log_path}:\n{self.log_tail()}"
                )
            if self._http_ok(pending[0]):
                pending.pop(0)
            else:
                time.sleep(0.1)

    def _record_children(self) -> None:
        """Remember the python-backend stubs, so they can be killed if the server is."""
        import psutil

        if not self.running:
            return
        assert self._proc is not None
        with contextlib.suppress(psutil.Error):
            known = {p.pid for p in self._children}  # type: ignore[attr-defined]
            for child in psutil.Process(self._proc.pid).children(recursive=True):
                if child.pid not in known:
                    self._children.append(child)

    def _kill(self) -> None:
        import psutil

        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # psutil.Process.kill checks the pid still belongs to the process recorded (its
        # creation time), so a reused pid is never hit.
        for child in self._children:
            with contextlib.suppress(psutil.Error):
                child.kill()  # type: ignore[attr-defined]
        self._children = []
        # A killed server leaves its python backend's shared-memory regions behind (a
        # stopped one removes them): the prefix is this launch's own.
        if self._shm_prefix and Path("/dev/shm").is_dir():
            for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()
        _LIVE.discard(self)
