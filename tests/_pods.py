"""Kubernetes pods as local processes: a Deployment's container started with its own command,
args and environment, its Services' names and its volumes mapped onto this machine.

How a pod becomes a process (the manifests themselves are not edited):

* command: the container's own (``tini --`` dropped: the test is the parent that reaps),
  else the image's ENTRYPOINT from the Dockerfile (``sh -c SCRIPT reidal ARGS...``).
  ``reidal`` is the one on ``bin_dir`` (this virtualenv's).
* environment: ConfigMaps (envFrom), literal values and the keys of the Secrets the
  manifests ship, as the kubelet builds it; ``$(VAR)`` in command and args expanded.
* Service names: every ``NAME:PORT`` of a Service, anywhere in the environment or the argv
  (``reidal-embedding:50051``, the host of ``postgresql://...@reidal-postgres:5432/...``),
  becomes ``127.0.0.1:`` the local port of the pod the Service selects (``external``: a
  server the test runs instead, here PostgreSQL; ``database``: the database name put in
  its URLs).
* ports: every containerPort of a pod gets a free loopback port; a flag whose value is a
  containerPort (``--port 50051``, ``--grpc-port=8001``) is given that port, and
  ``0.0.0.0`` becomes ``127.0.0.1``.
* volumes: every mountPath becomes a directory: one per PersistentVolumeClaim, shared by
  the pods that mount the claim (one node, as the laptop overlay's ReadWriteOnce
  volumes), one per emptyDir per pod.
* readiness: the container's readinessProbe (gRPC health of the named service, an HTTP
  GET) against the local ports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from _deploy_support import container_env, entrypoint, expand

from reidal.embedding.triton_server import free_ports

LOOPBACK = "127.0.0.1"


@dataclass
class Pod:
    """One Deployment's first container as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    ports: dict[int | str, int]  # containerPort number and name -> local port
    probe: dict[str, Any]
    workdir: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.workdir / "pod.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        with self.log.open("ab") as out:
            out.write(f"--- start {self.argv}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.workdir,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        """SIGKILL, as a node losing the pod would (no graceful stop)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes stops a pod (:meth:`stop` waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after the grace."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def address(self, port: int | str = "grpc") -> str:
        return f"{LOOPBACK}:{self.ports[port]}"

    def ready(self) -> bool:
        """What the readinessProbe would say now."""
        if "grpc" in self.probe:
            from reidal.health_probe import check

            p = self.probe["grpc"]
            return check(self.address(p["port"]), p.get("service", ""), timeout_s=2.0).ok
        if "httpGet" in self.probe:
            p = self.probe["httpGet"]
            try:
                with urllib.request.urlopen(f"http://{self.address(p['port'])}{p['path']}",
                                            timeout=2) as resp:
                    return resp.status == 200
            except (OSError, urllib.error.URLError):
                return False
        raise AssertionError(f"{self.name}: no grpc or httpGet readinessProbe")

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n"
                                     f"{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready in {timeout_s} s:\n{self.tail()}")
            time.sleep(0.3)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]


def plan_pods(objects: tuple[dict[str, Any], ...], root: Path, bin_dir: Path, *,
              external: dict[str, str], database: str) -> dict[str, Pod]:
    """A :class:`Pod` (not started) per Deployment of ``objects``, keyed by its name.

    external: ``"service-name:port" -> "host:port"`` for Services whose pods the test
    does not start (their workloads are not Deployments: PostgreSQL's StatefulSet).
    """
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    local: dict[str, dict[int | str, int]] = {}
    for d in deployments:
        c = _template(d)["spec"]["containers"][0]
        declared = c.get("ports", [])
        ports = dict(zip([p["containerPort"] for p in declared], free_ports(len(declared)),
                         strict=True))
        local[d["metadata"]["name"]] = {**ports, **{p["name"]: ports[p["containerPort"]]
                                                   for p in declared if "name" in p}}
    addresses = dict(external)
    for s in (o for o in objects if o["kind"] == "Service"):
        selector = s["spec"].get("selector", {})
        for d in deployments:
            labels = _template(d)["metadata"].get("labels", {})
            if selector and selector.items() <= labels.items():
                for p in s["spec"]["ports"]:
                    target = local[d["metadata"]["name"]][p.get("targetPort", p["port"])]
                    addresses[f"{s['metadata']['name']}:{p['port']}"] = f"{LOOPBACK}:{target}"
    claims: dict[str, Path] = {}
    pods = {}
    for d in deployments:
        name = d["metadata"]["name"]
        spec = _template(d)["spec"]
        c = spec["containers"][0]
        workdir = root / "pods" / name
        workdir.mkdir(parents=True)
        mounts = {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                host = claims.setdefault(claim, root / "claims" / claim)
            else:
                host = workdir / "volumes" / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            mounts[m["mountPath"]] = host
        rewrite = _rewriter(addresses, mounts, database)
        env = {k: rewrite(v) for k, v in container_env(c, objects, secrets=True).items()}
        ports = local[name]
        to_local = _port_flags({n: p for n, p in ports.items() if isinstance(n, int)})
        args = [to_local(rewrite(expand(a, env))) for a in c.get("args", [])]
        if c.get("command"):
            command = [rewrite(expand(a, env)) for a in c["command"]]
            if command[:2] == ["tini", "--"]:
                command = command[2:]
            argv = [to_local(a) for a in command] + args
        else:
            image = entrypoint()
            assert image[:4] == ["tini", "--", "sh", "-c"], image
            argv = ["sh", "-c", to_local(rewrite(image[4])), *image[5:], *args]
        base = {k: v for k, v in os.environ.items() if not k.startswith("REIDAL_")}
        process_env = {**base, "PATH": f"{bin_dir}{os.pathsep}{base.get('PATH', '')}",
                       "PYTHONUNBUFFERED": "1", **env}
        pods[name] = Pod(name, argv, process_env, ports, c["readinessProbe"], workdir)
    return pods


def _rewriter(addresses: dict[str, str], mounts: dict[str, Path], database: str):
    """Service addresses -> loopback, mount paths -> their directories, the database name
    of a ``postgresql://`` URL -> ``database``; in one pass, so a replaced path is never
    rewritten again."""
    names = sorted(addresses, key=len, reverse=True)
    paths = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(
        "|".join([rf"(?<![\w.-])(?P<a{k}>{re.escape(n)})(?!\d)" for k, n in enumerate(names)]
                 + [rf"(?<![\w.-])(?P<m{k}>{re.escape(p)})(?=/|\s|$|\"|')"
                    for k, p in enumerate(paths)]))

    def one(m: re.Match) -> str:
        group = m.lastgroup or ""
        index = int(group[1:])
        return addresses[names[index]] if group[0] == "a" else str(mounts[paths[index]])

    def rewrite(text: str) -> str:
        text = pattern.sub(one, text) if names or paths else text
        if text.startswith(("postgresql://", "postgres://")):
            parts = urlsplit(text)
            text = urlunsplit(parts._replace(path=f"/{database}"))
        return text

    return rewrite


def _port_flags(ports: dict[int, int]):
    """``--flag=N`` / ``--flag N`` with N a containerPort -> the local port; 0.0.0.0 ->
    loopback (in a token or a shell script alike)."""

    def to_local(text: str) -> str:
        text = re.sub(r"(--[\w-]+(?:=|\s+))(\d+)\b",
                      lambda m: m.group(1) + str(ports.get(int(m.group(2)), m.group(2))), text)
        return text.replace("0.0.0.0", LOOPBACK)

    return to_local
