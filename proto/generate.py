"""Regenerate the Python stubs for proto/sith/v1/*.proto into proto/sith_api/v1/ (the API package).

The protos keep their API paths (``sith/v1/sith.proto``, imported as such by adaptation.proto), so
the descriptors and reflection show the API, not a Python package. The Python package is
``sith_api``: the generated imports ``from sith.v1 import ...`` are rewritten to
``from sith_api.v1 import ...`` (the library owns the ``sith`` name).

    python proto/generate.py            # write the stubs
    python proto/generate.py --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = PROTO_ROOT / "sith" / "v1"
OUT_DIR = PROTO_ROOT / "sith_api" / "v1"
INIT = '"""Generated protobuf/gRPC stubs for package sith.v1 (run proto/generate.py; do not edit)."""\n'
_IMPORT = re.compile(r"^from sith\.v1 import ", re.MULTILINE)


def _include_dirs() -> list[str]:
    """grpc_tools ships google/protobuf/*.proto; googleapis-common-protos ships google/rpc/*.proto."""
    import google.rpc.status_pb2 as status_pb2

    well_known = str(resources.files("grpc_tools") / "_proto")
    googleapis = str(Path(status_pb2.__file__).resolve().parent.parent.parent)
    return [well_known, googleapis]


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into ``out_dir`` (the ``sith_api/v1`` folder); return the files written."""
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp)
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", *(f"-I{d}" for d in _include_dirs()),
                f"--python_out={dst}", f"--pyi_out={dst}", f"--grpc_python_out={dst}",
                *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for path in sorted((dst / "sith" / "v1").iterdir()):
            target = out_dir / path.name
            target.write_text(_IMPORT.sub("from sith_api.v1 import ", path.read_text()))
            written.append(target)
        (out_dir / "__init__.py").write_text(INIT)
        written.append(out_dir / "__init__.py")
    return written


def stale(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of generated files that differ from (or are missing in) ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp) / "v1")
        return [p.name for p in fresh
                if not (out_dir / p.name).is_file() or not filecmp.cmp(p, out_dir / p.name, shallow=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are out of date")
    args = parser.parse_args()
    if args.check:
        names = stale()
        if names:
            print(f"stale stubs: {', '.join(names)}; run python proto/generate.py", file=sys.stderr)
            raise SystemExit(1)
        print("stubs up to date")
        return
    for path in generate(OUT_DIR):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
