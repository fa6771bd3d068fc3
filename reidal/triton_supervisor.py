"""Keep the bundled Triton up: notice that its process died, reap it, start it again.

``reidal serve`` starts the Triton bundled with nvidia-pytriton as its child
(:mod:`reidal.embedding.triton_server`). If that process dies (killed, crashed, out of
memory), a :class:`TritonSupervisor` thread sees it within ``check_s`` seconds (asking
whether it runs reaps it, so no zombie stays), starts it again on the same ports (the
embedder's channels reconnect by themselves) with the models it was started with and
those loaded since (:attr:`TritonServer.startup_models`: each as its repository config
says, every version it keeps), all ready before the restart counts as done. Meanwhile
embedding calls answer UNAVAILABLE and the
EmbeddingService's health, which follows Triton's readiness, reads NOT_SERVING; it reads
SERVING again at the first probe after the restart.

Backoff (operational parameters, not the method's): the first restart after a death is
immediate; when Triton dies again (or fails to start) within ``stable_s`` seconds of the
last attempt, the next attempt waits ``backoff_s`` seconds, doubled each time up to
``max_backoff_s``, so a Triton that cannot start does not spin.

A Triton reidal did not start (``--triton-url``, the NGC pod in Kubernetes) is restarted
by whatever runs it, not by this.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from reidal.logs import log_kv

if TYPE_CHECKING:
    from reidal.embedding.triton_server import TritonServer

log = logging.getLogger("reidal.triton")

#: Seconds between checks of the process.
CHECK_S = 1.0
#: First wait before a restart that follows a recent one, and its cap (doubling between).
BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
#: A Triton up this long since its last restart counts as healthy: the backoff starts over.
STABLE_S = 60.0


class TritonSupervisor:
    """Restarts ``server`` when it dies (see the module docstring); ``start`` / ``stop``."""

    def __init__(self, server: TritonServer, *, check_s: float = CHECK_S,
                 backoff_s: float = BACKOFF_S, max_backoff_s: float = MAX_BACKOFF_S,
                 stable_s: float = STABLE_S) -> None:
        if check_s <= 0 or backoff_s <= 0 or max_backoff_s < backoff_s or stable_s < 0:
            raise ValueError("need check_s > 0, 0 < backoff_s <= max_backoff_s, stable_s >= 0")
        self.server = server
        self.check_s = check_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.restarts = 0  # successful restarts so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TritonSupervisor:
        self._thread = threading.Thread(target=self._run, name="reidal-triton-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching (call ``server.stop()`` too: it ends a restart in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.0
        last_attempt = -float("inf")
        while not self._stop.wait(self.check_s):
            try:
                if not self.server.died:
                    continue
                recent = time.monotonic() - last_attempt < self.stable_s
                delay = min(max(2 * delay, self.backoff_s), self.max_backoff_s) if recent else 0.0
                log_kv(log, logging.WARNING, "triton_died", exit_code=self.server.returncode,
                       restart_in_s=delay)
                if delay and self._stop.wait(delay):
                    return
                last_attempt = time.monotonic()
                if self.server.restart_if_dead(pdeathsig=True):
                    self.restarts += 1
                    log_kv(log, logging.WARNING, "triton_restarted", grpc=self.server.grpc_url,
                           restarts=self.restarts, models=",".join(self.server.startup_models))
            except Exception as exc:  # a failed start: the next check tries again, later
                log_kv(log, logging.ERROR, "triton_restart_failed",
                       error=f"{type(exc).__name__}: {exc}"[:2000])
