#!/usr/bin/env python3
"""Regenerate the committed gRPC/protobuf code of the memos-client package.

    python scripts/gen_protos.py          # rewrite clients/python/memosd_client/v1/
    python scripts/gen_protos.py --check  # exit 1 if the committed code is stale

Generated modules: *_pb2.py, *_pb2_grpc.py and their .pyi stubs (mypy-protobuf); and, where node and
clients/node/node_modules are installed, the Node client's typedefs (clients/node/src/messages.js, by
clients/node/scripts/gen-types.js), so one command regenerates every copy of the contract.
The protos live at protos/memos/v1 (their proto package and file names, which reflection and every other
language's client see, stay memos.v1 and memos/v1/*.proto), but the Python package is memosd_client: protoc
writes imports from the file paths (`from memos.v1 import types_pb2`), so they are rewritten to
`memosd_client.v1` here, as protoletariat does. Only import lines and the generated module's own name are
touched: the serialized descriptors and the '/memos.v1.MemOS/...' method paths keep the wire names.
The output depends on the grpcio-tools and mypy-protobuf versions pinned in
clients/python/pyproject.toml's `gen` extra; CI runs --check with those.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python"
PROTO_DIR = Path("memos") / "v1"  # under protos/: the proto package memos.v1
PACKAGE_DIR = Path("memosd_client") / "v1"  # under clients/python/: the Python package
# What protoc writes, from the proto file paths, and what the Python package is called.
_IMPORT_REWRITES = [
    (re.compile(r"^from memos\.v1 import ", re.M), "from memosd_client.v1 import "),
    (re.compile(r"^import memos\.v1\.", re.M), "import memosd_client.v1."),
    (re.compile(r"\(DESCRIPTOR, 'memos\.v1\.(\w+_pb2)'"), r"(DESCRIPTOR, 'memosd_client.v1.\1'"),
]


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) over protos/memos/v1 into out_root."""
    import grpc_tools  # imported here so --help works without grpcio-tools

    protos = sorted((PROTO_ROOT / PROTO_DIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out_root / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}", f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    generated = sorted(p for p in (out_root / PROTO_DIR).iterdir() if _is_generated(p))
    for path in generated:
        text = path.read_text()
        for pattern, replacement in _IMPORT_REWRITES:
            text = pattern.sub(replacement, text)
        path.write_text(text)
    return generated


def _is_generated(path: Path) -> bool:
    return path.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))


NODE_TYPES = ROOT / "clients" / "node" / "scripts" / "gen-types.js"


def node_types(check: bool) -> int:
    """Regenerate (or --check) the Node client's typedefs; 0 where node or its packages are not installed
    (the Node suite checks them too, and fails in CI when node is missing)."""
    node = shutil.which("node")
    if node is None or not (ROOT / "clients" / "node" / "node_modules").is_dir():
        print("node typedefs: skipped (node or clients/node/node_modules not installed)")
        return 0
    return subprocess.run([node, str(NODE_TYPES), *(["--check"] if check else [])], cwd=ROOT).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs")
    args = parser.parse_args()
    target = OUT_ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p for p in target.iterdir() if _is_generated(p)) if target.exists() else []
        if args.check:
            stale = sorted(
                {p.name for p in fresh} ^ {p.name for p in committed}
                | {p.name for p in fresh if (target / p.name).exists() and not filecmp.cmp(p, target / p.name, shallow=False)}
            )
            if stale:
                print("generated code is stale; run scripts/gen_protos.py:", *stale, sep="\n  ")
                return 1
            print(f"generated code is up to date ({len(fresh)} files)")
            return node_types(check=True)
        for old in committed:
            old.unlink()
        for new in fresh:
            shutil.copyfile(new, target / new.name)
            print(f"wrote {(target / new.name).relative_to(ROOT)}")
    return node_types(check=False)


if __name__ == "__main__":
    raise SystemExit(main())
