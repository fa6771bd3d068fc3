"""The Node.js client (clients/node) and the grpcurl page (docs/grpcurl.md), checked from pytest
so that CI runs them.

- The Node client's own tests (``node --test``) start a real ``reidal serve`` themselves and
  run the whole loop; this file only installs the npm packages when they are missing
  (``npm ci``, from the committed package-lock.json) and fails with node's output.
- grpcurl is not installed here, so the page is checked the way grpcurl uses a server: every
  service's descriptors are fetched by server reflection (file_containing_symbol, then the
  imports by file_by_filename) into a descriptor pool, and every method the page calls and
  every request body it sends must resolve and parse against it. The core services' every
  method must have an example.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from reidal.serve import serve

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "clients" / "node"
GRPCURL_DOC = ROOT / "docs" / "grpcurl.md"
#: Services whose every method docs/grpcurl.md must show.
DOCUMENTED_SERVICES = ("reidal.v1.CollectionService", "reidal.v1.SamplingService",
                       "reidal.v1.ConstraintService", "reidal.v1.EmbeddingService")


def _tail(text: str, limit: int = 12000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def test_node_client_runs_the_whole_loop_against_a_real_server() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the Node.js client's tests need Node.js >= 18 and npm "
                    "(Debian: apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "node is installed but npm is not: cannot install clients/node"
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"npm ci in clients/node failed (exit {done.returncode}):\n"
                        f"{_tail(done.stdout + done.stderr)}")
    tests = sorted(str(p.relative_to(NODE_DIR)) for p in (NODE_DIR / "test").glob("*.test.js"))
    assert tests, "clients/node/test has no *.test.js"
    env = {**os.environ, "REIDAL_BIN": str(Path(sys.executable).with_name("reidal"))}
    # Its own process group, so a timeout also stops the reidal server (and Triton) it started.
    proc = subprocess.Popen([node, "--test", *tests], cwd=NODE_DIR, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"node --test ran over 300 s:\n{_tail(output)}")
    if proc.returncode != 0:
        pytest.fail(f"node --test failed (exit {proc.returncode}):\n{_tail(output)}")
    passed = re.search(r"^# pass (\d+)$", output, re.M)
    assert passed and int(passed.group(1)) > 0, _tail(output)
    assert re.search(r"^# fail 0$", output, re.M), _tail(output)


# ------------------------------------------------------------------ grpcurl page


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reflected_pool(address: str) -> tuple[set[str], descriptor_pool.DescriptorPool]:
    """The listed services and a pool built from reflection alone, as grpcurl builds it."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
            [answer] = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)
            assert not answer.HasField("error_response"), (request, answer.error_response)
            return answer

        services = {s.name for s in ask(list_services="").list_services_response.service}
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

        def keep(answer: reflection_pb2.ServerReflectionResponse) -> None:
            for raw in answer.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files.setdefault(fd.name, fd)

        for name in sorted(services):
            keep(ask(file_containing_symbol=name))
        while missing := sorted({d for f in files.values() for d in f.dependency} - set(files)):
            for name in missing:
                keep(ask(file_by_filename=name))

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

    for name in sorted(files):
        add(name)
    return services, pool


def _doc_commands(text: str) -> list[str]:
    """Each grpcurl command of the page's sh blocks, continuation lines and heredoc joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n", " ", block)
        lines = block.split("\n")
        k = 0
        while k < len(lines):
            line = lines[k]
            while line.count("'") % 2 and k + 1 < len(lines):  # a quoted body spans lines
                k += 1
                line = line + "\n" + lines[k]
            heredoc = re.search(r"<<'(\w+)'", line)
            if heredoc:
                end = lines.index(heredoc.group(1), k + 1)
                line = line + "\n" + "\n".join(lines[k + 1:end])
                k = end
            if "grpcurl" in line and not line.lstrip().startswith("#"):
                commands.append(line)
            k += 1
    return commands


def _bodies(command: str) -> list[dict]:
    """The request messages a command sends: -d '...' or a heredoc of JSON objects."""
    body = re.search(r"-d '(.*?)'", command, re.S)
    if body:
        return [json.loads(body.group(1))]
    heredoc = re.search(r"<<'\w+'\n(.*)", command, re.S)
    if heredoc is None:
        return []
    decoder, text, out, pos = json.JSONDecoder(), heredoc.group(1), [], 0
    while pos < len(text.rstrip()):
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_grpcurl_page_calls_only_what_reflection_offers(tmp_path: Path) -> None:
    # Reflection needs no backend: the server runs with a Triton address nothing listens on.
    server = serve("all", data_dir=tmp_path, triton_url=f"127.0.0.1:{_closed_port()}",
                   start_triton=False, health_interval_s=60)
    try:
        services, pool = _reflected_pool(server.address)
    finally:
        server.stop(grace=0)
    assert set(DOCUMENTED_SERVICES) | {"reidal.v1.TrainingService",
                                       "grpc.health.v1.Health"} <= services

    text = GRPCURL_DOC.read_text(encoding="utf-8")
    listing = re.search(r"localhost:50051 list\n((?:# .*\n)+)", text)
    assert listing is not None, "the page shows no `list` output"
    assert {line[2:] for line in listing.group(1).splitlines()} == services

    called: set[str] = set()
    for command in _doc_commands(text):
        described = re.search(r" describe (\S+)", command)
        if described:
            name = described.group(1)
            service, _, method = name.rpartition(".")
            if f"{service}.{method}" in services:
                continue
            if service in services:
                assert method in pool.FindServiceByName(service).methods_by_name, command
            else:
                pool.FindMessageTypeByName(name)
            continue
        target = re.search(r"localhost:50051 ([\w.]+)/(\w+)", command.split("<<")[0])
        if target is None:
            continue
        service, method = target.groups()
        assert service in services, f"{service} is not served: {command}"
        rpc = pool.FindServiceByName(service).methods_by_name.get(method)
        assert rpc is not None, f"{service} has no method {method}: {command}"
        called.add(f"{service}/{method}")
        request_class = message_factory.GetMessageClass(rpc.input_type)
        bodies = _bodies(command)
        assert len(bodies) <= 1 or rpc.client_streaming, command
        for body in bodies:
            json_format.ParseDict(body, request_class())  # unknown field or bad enum: raises
    for service in DOCUMENTED_SERVICES:
        for method in pool.FindServiceByName(service).methods_by_name:
            assert f"{service}/{method}" in called, f"docs/grpcurl.md shows no {service}/{method}"
