"""Build hook for the Somna Python SDK.

The gRPC stubs (``somna/v1/*_pb2.py``, ``*_pb2_grpc.py``, ``*.pyi``) are
generated from the repository's ``proto/somna/v1/*.proto`` with grpcio-tools
every time the package is built, so they can never drift from the API and are
not committed. The protos are looked up in ``$SOMNA_PROTO_DIR``, then in
``./proto`` (an sdist carries a copy there), then in ``../../proto`` (a build
from the repository).

The package's runtime requirements are the grpcio and protobuf versions the
generated code itself asks for (it checks them when imported).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).parent.resolve()


def proto_root() -> Path:
    candidates = [os.environ.get("SOMNA_PROTO_DIR"), HERE / "proto", HERE.parent.parent / "proto"]
    for cand in candidates:
        if cand and (Path(cand) / "somna" / "v1" / "sandbox.proto").is_file():
            return Path(cand)
    raise SystemExit(
        "somna: cannot find the API protos (somna/v1/*.proto). Build the SDK from the "
        "Somna repository (sdk/python), or set SOMNA_PROTO_DIR to the proto/ directory."
    )


def generate(out_dir: Path) -> None:
    """Runs protoc (from grpcio-tools) on somna/v1/*.proto into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    root = proto_root()
    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(root)) for p in (root / "somna" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"somna: protoc failed on {root}/somna/v1")
    (out_dir / "somna" / "v1" / "__init__.py").write_text(
        '"""gRPC stubs for the somna.v1 API, generated at build time from proto/somna/v1."""\n'
    )


_GENERATED = Path(tempfile.mkdtemp(prefix="somna-stubs-"))
generate(_GENERATED)


def runtime_requirements() -> list[str]:
    """grpcio/protobuf at least as new as the generated code requires."""
    v1 = _GENERATED / "somna" / "v1"
    grpc_min, pb_min = "1.66.0", "5.27.0"
    for f in v1.glob("*_pb2_grpc.py"):
        m = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", f.read_text())
        if m:
            grpc_min = m.group(1)
    for f in v1.glob("*_pb2.py"):
        m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", f.read_text())
        if m:
            pb_min = ".".join(m.groups())
    return [f"grpcio>={grpc_min}", f"protobuf>={pb_min}"]


class BuildPyWithStubs(build_py):
    """build_py that adds the generated stubs to the built package."""

    def run(self) -> None:
        super().run()
        dst = Path(self.build_lib) / "somna" / "v1"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(_GENERATED / "somna" / "v1", dst)


class SdistWithProtos(sdist):
    """sdist that carries the protos, so it builds away from the repository."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        src = proto_root() / "somna" / "v1"
        dst = Path(base_dir) / "proto" / "somna" / "v1"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst)


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos},
)
