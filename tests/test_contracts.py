"""The .proto files are the published contract: they must compile for other languages too.

CI installs Debian's protobuf-compiler (see the Makefile's `protoc` target) and this test
generates C++ and Java sources from protos/, then syntax-checks the C++ with the system's
protobuf headers. Where protoc is absent (a laptop without root) the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc_tools
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOS = sorted((ROOT / "protos" / "reidal" / "v1").glob("*.proto"))
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"


def _protoc() -> str:
    protoc = shutil.which("protoc")
    if protoc is None:
        if os.environ.get("CI"):
            pytest.fail("protoc is missing in CI: the Makefile's `protoc` target installs it")
        pytest.skip("protoc (Debian's protobuf-compiler) is not installed")
    return protoc


def test_protos_compile_to_cpp_and_java(tmp_path):
    protoc = _protoc()
    cpp, java = tmp_path / "cpp", tmp_path / "java"
    cpp.mkdir()
    java.mkdir()
    subprocess.run(
        [protoc, f"-I{ROOT / 'protos'}", f"-I{WELL_KNOWN}", f"--cpp_out={cpp}",
         f"--java_out={java}", *map(str, PROTOS)],
        check=True, capture_output=True, text=True,
    )
    sources = sorted(cpp.rglob("*.pb.cc"))
    assert [s.name for s in sources] == sorted(p.stem + ".pb.cc" for p in PROTOS)
    services = [cls for cls in java.rglob("*.java") if cls.stem.endswith("Request")]
    assert services, "no Java request classes were generated"
    gxx = shutil.which("g++")
    if gxx and Path("/usr/include/google/protobuf/message.h").exists():
        for src in sources:
            done = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", f"-I{cpp}", str(src)],
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{src.name} does not compile:\n{done.stderr[-2000:]}"
