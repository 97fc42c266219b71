"""Every edit table and plot from one command (issue 11: "experiments/ regenerates every table and
plot with one command").

    nice .venv/bin/python experiments/regenerate.py            # testbed-main and testbed-small
    nice .venv/bin/python experiments/regenerate.py --jobs 1   # one model at a time

Per model, in order: the frontier (experiments/frontier.py: frontier.json, frontier.md,
docs/figures/frontier-<model>.png), the λ_o sweep with the four configurations docs/edits.md
reports (preserve_others_sweep.json), the retention diagnostics (retention_diagnostics.json) and
the three further edit families (retention_variants.json). The models run side by side (``--jobs``,
one process each, one torch thread each: two torch threads can stall in an OpenMP barrier on a
shared 2-core VM); then, over both models' frontier points, how well each presence of an anchored
removal ranks its validation recall (anchor_presence.json), and the paper's editing experiments
(run_experiments.py: results.json, tables.md) run once over both. Measured on the 2-core AMD EPYC
VM, shared: 39 minutes (2026-11-30; 41 on 2026-11-29 with a CI run beside it, 29 before the
frontier's default operator also ran over the anchor weight); every JSON and table but the frontier's,
whose planner had changed, came out identical (timings aside).

The sweep appends to its JSON, so that file is started afresh (git keeps the old one).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKPOINTS = HERE.parent / "sith" / "testbed" / "checkpoints"
MODELS = ("testbed-main", "testbed-small")
# The λ_o sweep's stored configurations (docs/edits.md, "Protecting the other factors").
SWEEPS = {
    "common": (["--grid", "0", "2", "8", "32", "128", "--lam", "1", "2", "4", "8", "--rule", "library", "world", "no_group"],
               ["--grid", "0.5", "4", "--lam", "2"],
               ["--grid", "0", "4", "8", "--lam", "2", "--target", "0.25", "0.3"]),
    "testbed-main": (["--grid", "0", "8", "--lam", "2", "--last", "3", "4", "5"],),
    "testbed-small": (["--grid", "0", "8", "32", "--lam", "2", "4", "--last", "2", "3", "4"],),
}


def _run(args: list[str]) -> None:
    started = time.time()
    print(f"$ {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=HERE.parent)
    print(f"  done in {time.time() - started:.0f} s: {' '.join(args[:3])}", flush=True)


def model_chain(name: str) -> None:
    folder = str(CHECKPOINTS / name)
    _run([str(HERE / "frontier.py"), "--model", folder])
    for extra in (*SWEEPS["common"], *SWEEPS.get(name, ())):
        _run([str(HERE / "preserve_others_sweep.py"), "--model", folder, *extra])
    _run([str(HERE / "retention_diagnostics.py"), "--model", folder])
    _run([str(HERE / "retention_variants.py"), "--model", folder])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="models run side by side (default 2)")
    parser.add_argument("--model", action="append", choices=MODELS, help="default: both")
    args = parser.parse_args(argv)
    models = args.model or list(MODELS)
    missing = [m for m in models if not (CHECKPOINTS / m).is_dir()]
    if missing:
        print(f"missing testbed checkpoints: {missing}", file=sys.stderr)
        return 1
    sweep = HERE / "preserve_others_sweep.json"
    sweep.unlink(missing_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(model_chain, m) for m in models]:
            future.result()  # a failed step raises here (CalledProcessError names the command)
    _run([str(HERE / "anchor_presence.py")])  # reads both models' frontier points
    _run([str(HERE / "run_experiments.py"), *[a for m in models for a in ("--model", str(CHECKPOINTS / m))]])
    for script in ("preserve_others_sweep.py", "retention_variants.py"):
        _run([str(HERE / script), "--summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
