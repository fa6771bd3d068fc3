"""What the deploy tests share: the manifests as Kustomize renders them (or as written), the
pod specs and containers in them, the environment a kubelet would give a container, and the
Dockerfile's instructions and entry point. No cluster and no container engine needed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


@cache
def kubectl() -> str | None:
    """A kubectl whose Kustomize understands components (>= v4), or None."""
    candidates = [os.environ.get("REIDAL_KUBECTL"), str(Path(sys.prefix) / "bin" / "kubectl"),
                  shutil.which("kubectl")]
    for c in candidates:
        if not c or not Path(c).is_file():
            continue
        try:
            out = subprocess.run([c, "version", "--client"], capture_output=True, text=True,
                                 timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"Kustomize Version: v(\d+)", out)
        if m and int(m.group(1)) >= 4:
            return c
    return None


def need_kubectl() -> str:
    path = kubectl()
    if path is None:
        pytest.skip("no kubectl with Kustomize >= 4 ($REIDAL_KUBECTL, the virtualenv's bin/, "
                    "PATH): rendered overlays not checked")
    return path


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([need_kubectl(), "kustomize", str(K8S / target)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def pod_spec(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, pod spec)`` of every pod template an object holds."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return [(obj["metadata"]["name"], obj["spec"]["template"]["spec"])]
    if kind == "PyTorchJob":
        return [(f"{obj['metadata']['name']}/{role}", spec["template"]["spec"])
                for role, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    return []


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_env(c: dict[str, Any], objects: tuple[dict[str, Any], ...], *,
                  secrets: bool = False) -> dict[str, str]:
    """The container's environment as the kubelet builds it: ConfigMaps through envFrom,
    literal values, with ``secrets`` the Secret keys ``objects`` ship, and a stand-in for
    values only a cluster knows (other Secrets, fieldRefs)."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    shipped = {o["metadata"]["name"]: secret_data(o) for o in objects if o["kind"] == "Secret"}
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(maps.get(src.get("configMapRef", {}).get("name"), {}))
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef", {})
        value = shipped.get(ref.get("name"), {}).get(ref.get("key")) if secrets else None
        env[e["name"]] = e.get("value", value if value is not None else f"<{e['name']}>")
    return env


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's keys and values (``data`` is base64, ``stringData`` plain and wins)."""
    out = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return {**out, **secret.get("stringData", {})}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)),
                  text)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per logical line: continuations joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    lines = dockerfile()
    last = max(i for i, (w, _) in enumerate(lines) if w == "FROM")
    return lines[last:]


def entrypoint() -> list[str]:
    """The final stage's ENTRYPOINT (exec form): ``tini -- sh -c SCRIPT reidal``."""
    (rest,) = [r for w, r in final_stage() if w == "ENTRYPOINT"]
    argv = json.loads(rest)
    assert argv[:4] == ["tini", "--", "sh", "-c"], argv
    return argv


def entrypoint_script() -> str:
    return entrypoint()[4]
