"""Generate the Python code of `expertmesh/v1/*.proto` into `v1/` (the `make protos` target).

    python -m expertmesh.protos.generate            # rewrite protos/v1/
    python -m expertmesh.protos.generate --check    # exit 1, naming the files, when the committed code is stale

protoc names a generated module after its .proto path (`expertmesh.v1.admin_pb2`); ours live in the package
`expertmesh.protos.v1`, so sibling imports between generated modules are rewritten to relative ones.
Needs `grpcio-tools` (a dev dependency): installs use the committed code.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_ROOT", "OUT_DIR", "generate", "stale"]

PROTO_ROOT = Path(__file__).resolve().parent  # holds expertmesh/v1/*.proto
OUT_DIR = PROTO_ROOT / "v1"
_PROTO_PACKAGE = "expertmesh/v1"
_SIBLING_IMPORT = re.compile(r"^from expertmesh\.v1 import ", re.MULTILINE)


def generate() -> dict[str, str]:
    """File name -> text of every generated module (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`)."""
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / _PROTO_PACKAGE).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"{PROTO_ROOT / _PROTO_PACKAGE}: no .proto files")
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("grpc_tools: install the dev dependencies (grpcio-tools)", name="grpc_tools")
    well_known = Path(spec.submodule_search_locations[0]) / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        # protoc in its own process: its bundled libprotobuf aborts when loaded beside torch or Ray's.
        args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        done = subprocess.run(args, cwd=PROTO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed on {protos}:\n{done.stderr}")
        generated = sorted((Path(tmp) / _PROTO_PACKAGE).iterdir())
        return {p.name: _SIBLING_IMPORT.sub("from . import ", p.read_text()) for p in generated}


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Generated files that are missing from `out_dir`, differ there, or are there but no longer generated."""
    fresh = generate()
    committed = {p.name for p in out_dir.glob("*_pb2*")}
    differ = [name for name, text in fresh.items()
              if not (out_dir / name).is_file() or (out_dir / name).read_text() != text]
    return sorted(differ + [name for name in committed - fresh.keys()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        files = stale()
        for name in files:
            print(f"{OUT_DIR / name}: stale, run `make protos`", file=sys.stderr)
        return 1 if files else 0
    for old in OUT_DIR.glob("*_pb2*"):
        old.unlink()
    for name, text in generate().items():
        (OUT_DIR / name).write_text(text)
        print(OUT_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
