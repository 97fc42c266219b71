"""``load_model`` against its floor: reading the weights file and hashing it, in the same run.

For each model (random init, seed 0, saved once as an open_clip folder with safetensors weights),
fresh processes alternately (twice each, best kept):

* floor — read the weights file in 16 MiB chunks and sha256 it (what any loader that names its
          weights by content must do at least);
* load  — ``sith.engine.models.load_model(folder)``: build, load, hash, eval mode.

The page cache is warm for both (the file was just written or read), so "read" means memory
bandwidth, as for a model a user loads repeatedly. Target: load ≤ 1.5× the floor. CPU time is the
figure of record on the shared CPU (see _common.py); peak RSS shows the weights held once, not twice.

    nice .venv/bin/python benchmarks/bench_load.py [--models ViT-B-32,ViT-L-14]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def child(mode: str, folder: Path, device: str) -> None:
    from _common import peak_rss_mb

    import sith.engine.models as models  # imported before the clock starts: load, not import, is measured

    w0, c0 = time.perf_counter(), time.process_time()
    if mode == "floor":
        digest = hashlib.sha256()
        with open(folder / "open_clip_model.safetensors", "rb") as handle:
            while chunk := handle.read(16 << 20):
                digest.update(chunk)
        name = digest.hexdigest()[:12]
    else:
        loaded = models.load_model(str(folder), device=device)
        name = loaded.hash[:12]
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_rss_mb": peak_rss_mb(), "hash": name}))


def main() -> None:
    from bench_explain import prepare_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sith-bench"))
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--child", choices=["floor", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.device)
        return
    from _common import ChildFailed, machine, run_child

    results = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        folder = prepare_folder(model, Path(args.workdir))
        size = (folder / "open_clip_model.safetensors").stat().st_size
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for mode in ("floor", "load"):
                try:
                    r = run_child(Path(__file__).resolve(), [mode, "--folder", str(folder), "--device", args.device])
                except ChildFailed as exc:
                    raise SystemExit(f"{model} {mode}: {exc}") from None
                if mode not in best or r["cpu"] < best[mode]["cpu"]:
                    best[mode] = r
        results[model] = {"bytes": size, **best}
    print(machine())
    print(f"{'model':>10} {'file MB':>8} {'floor CPU/wall s':>17} {'load CPU/wall s':>16} {'load/floor':>10} "
          f"{'peak RSS MB (floor/load)':>25}")
    for model, r in results.items():
        f, ld = r["floor"], r["load"]
        print(f"{model:>10} {r['bytes'] / 2**20:8.0f} {f['cpu']:8.2f}/{f['wall']:7.2f} "
              f"{ld['cpu']:7.2f}/{ld['wall']:7.2f} "
              f"{ld['cpu'] / f['cpu']:9.2f}x {f['peak_rss_mb']:12.0f}/{ld['peak_rss_mb']:.0f}   (target <= 1.5x)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"benchmark": "load", "machine": machine(), "results": results},
                                                   indent=2))


if __name__ == "__main__":
    main()
