"""Run every benchmark from one command, on the CPU or a GPU; logs and JSON land in one folder.

    .venv/bin/python benchmarks/run_all.py [--device cuda] [--quick] [--only svd,explain-b32] [--out DIR]

On a GPU the GPU runs the heavy parts (the CPU still builds the random-init models; benchmarks that
never touch the GPU — world, service load, hardening, download — run with their short settings).
Measured on one H200 (RESULTS.md §5): the whole set takes well over 5 minutes (SVD, COMP, dictionary
and the ViT-B-32 explain alone ~300 s); use ``--only`` to fit a short lease. Whether the GPU gives
the CPU's answers is checked by ``benchmarks/gpu_equivalence.py``.

On the shared 2-core CPU a full run takes hours under load, so ``--quick`` shrinks every benchmark
(fewer layers/heads/concepts, noted in its output) to check that each one still runs. CPU runs go through ``nice -n 10`` with one torch thread unless
``--threads`` says otherwise. Benchmarks found in this folder but not listed below (other helpers'
new ones) run with their default arguments under ``--all``.

At the end a summary prints each benchmark's status, its wall time and its headline lines (the
ratios), ready to paste into benchmarks/RESULTS.md with the machine line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, args on the CPU, args on a GPU, args added by --quick); "{device}" is substituted.
PLAN: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "svd": ("bench_svd.py", ["--thread-check"], ["--device", "{device}"],
            ["--layers", "4", "--dense-heads", "2"]),
    "comp": ("bench_comp.py", [], ["--device", "{device}"], ["--atoms", "5000"]),
    "dictionary": ("bench_dictionary.py", [], ["--device", "{device}"], ["--concepts", "500"]),
    "explain-b32": ("bench_explain.py", ["--model", "ViT-B-32"], ["--device", "{device}"], ["--concepts", "2000"]),
    "explain-l14": ("bench_explain.py", ["--model", "ViT-L-14"], ["--device", "{device}"], ["--concepts", "1000"]),
    "load": ("bench_load.py", [], ["--device", "{device}"], ["--models", "ViT-B-32"]),
    "scaling": ("bench_scaling.py", [], ["--device", "{device}", "--models", "ViT-B-32,ViT-L-14,ViT-H-14"],
                ["--models", "ViT-B-32", "--concepts", "500"]),
    "world": ("bench_world.py", [], [], ["-n", "300", "--repeats", "1"]),
    "service-load": ("bench_service_load.py", [], [], ["--requests", "300", "--duration", "20", "--reps", "10"]),
    "hardening": ("bench_hardening.py", [], [], ["--quick"]),
    "download": ("bench_download.py", [], [], ["--mib", "32", "--repeats", "2"]),
    "embed-images": ("bench_embed_images.py", [], [], ["--repeats", "3"]),
}
HEADLINE_WORDS = ("x ", "x)", "ratio", "speed-up", "warm / cold", "per work", "target", "not run", "failed")


def command_for(name: str, args: argparse.Namespace) -> list[str] | None:
    if name in PLAN:
        script, cpu_args, gpu_args, quick_args = PLAN[name]
        on_gpu = args.device != "cpu"
        extra = list(cpu_args) + ([a.format(device=args.device) for a in gpu_args] if on_gpu else [])
        if args.quick or (on_gpu and not gpu_args):  # CPU-only benchmarks stay short in a GPU run
            extra += quick_args
    else:
        script, extra = f"bench_{name.replace('-', '_')}.py", []
    if not (HERE / script).is_file():
        return None
    command = [sys.executable, str(HERE / script), *extra]
    if args.device == "cpu" and not args.no_nice:
        command = ["nice", "-n", "10", *command]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=os.environ.get("SITH_DEVICE", "cpu"))
    parser.add_argument("--quick", action="store_true", help="shrunk sizes: a smoke run on a busy CPU")
    parser.add_argument("--only", help="comma-separated names (default: all of " + ", ".join(PLAN) + ")")
    parser.add_argument("--all", action="store_true", help="also run unlisted bench_*.py with default args")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on the CPU)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "sith-bench" / "out"),
                        help="logs and summary.json (on a lent GPU machine: --out $OUT)")
    parser.add_argument("--no-nice", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(PLAN)
    if args.all:
        names += sorted(p.stem[len("bench_"):].replace("_", "-") for p in HERE.glob("bench_*.py")
                        if p.name not in {s for s, *_ in PLAN.values()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        threads = str(args.threads or 1)
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, SITH_THREADS=threads)
    else:
        env["SITH_DEVICE"] = args.device
    summary = []
    started = time.perf_counter()
    for name in names:
        command = command_for(name, args)
        if command is None:
            summary.append({"name": name, "status": "missing", "seconds": 0.0, "headline": []})
            continue
        if args.device != "cpu" and name in PLAN and not PLAN[name][2]:
            note = "CPU-only benchmark (runs on the host CPU alongside the GPU)"
        else:
            note = ""
        print(f"== {name}: {' '.join(command)}", flush=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            text = done.stdout + ("\n" + done.stderr if done.returncode else "")
        except subprocess.TimeoutExpired as exc:
            status = f"timeout {args.timeout:.0f}s"
            text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        seconds = time.perf_counter() - t0
        (out / f"{name}.log").write_text(text)
        headline = [line for line in text.splitlines() if any(w in line for w in HEADLINE_WORDS)][:12]
        summary.append({"name": name, "status": status, "seconds": seconds, "headline": headline, "note": note})
        print(text.strip()[-4000:], flush=True)
    total = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps({"device": args.device, "quick": args.quick,
                                                  "total_seconds": total, "runs": summary}, indent=2))
    print(f"\n== summary ({args.device}{', quick' if args.quick else ''}): {total:.0f} s in all; logs in {out}")
    for row in summary:
        print(f"- {row['name']}: {row['status']}, {row['seconds']:.0f} s {row.get('note', '')}")
        for line in row["headline"]:
            print(f"    {line.strip()}")
    if any(row["status"] not in ("ok",) for row in summary if row["status"] != "missing"):
        sys.exit(1)


if __name__ == "__main__":
    main()
