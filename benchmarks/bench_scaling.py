"""Scaling: time and peak memory of decompose + explain and of edit + export, per model size.

One fresh process per model (random init, saved to a folder first so loading reads a file, as a
user's would), no artifact cache, one dictionary size for every model (default 2,000 concepts, so
COMP's work grows only with the model). Phases:

* load               — ``load_model`` of the folder;
* dictionary         — encoding the concepts (text tower);
* decompose          — SVD of every layer (the data-free image mean and the analysed layers);
* explain            — joint-space targets, COMP codes and explanations of the last four layers;
* edit plan          — ``plan_edit`` (suppress one concept, default operator: selection, preview);
* apply+export       — ``apply_multipliers`` and ``export_model`` to a folder.

Each phase's time is divided by its work unit (decompose and edit plan: layers·heads·d·r²;
explain: (4 + 2·layers)·heads·r·atoms·D — COMP of the last four layers plus the confidence's
tower-wide atom statistics over both poles of every vector; load and apply+export: parameters)
and shown relative to the first model, so "grows faster than its work" reads as a ratio above 1.
Peak RSS is the process's high-water mark after each phase.

    nice .venv/bin/python benchmarks/bench_scaling.py [--models ViT-B-32,ViT-L-14] [--concepts 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def child(args: argparse.Namespace) -> None:
    import torch
    from _common import Stopwatch, machine, peak_rss_mb, setup

    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary, default_vocabulary
    from sith.engine.memo import process_memo
    from sith.engine.models import load_model

    setup(args.threads, args.device)
    watch = Stopwatch()
    peaks: dict[str, float] = {}
    with watch.phase("load", args.device):
        loaded = load_model(str(args.folder), device=args.device)
    peaks["load"] = peak_rss_mb()
    concepts = default_vocabulary()[: args.concepts]
    with watch.phase("dictionary", args.device):
        dictionary = build_dictionary(loaded, concepts, cache_dir=args.scratch / "dictionaries")
    peaks["dictionary"] = peak_rss_mb()
    info = loaded.info
    with watch.phase("decompose", args.device), torch.no_grad():
        analyzer = Analyzer(loaded, dictionary, device=args.device)
        analyzer.joint  # noqa: B018 - every layer's SVD (the data-free image mean)
        analyzer.decomposition()
    peaks["decompose"] = peak_rss_mb()
    with watch.phase("explain", args.device), torch.no_grad():
        analyzer.explain()
    peaks["explain"] = peak_rss_mb()
    edit_error = None
    try:
        from sith.edits.apply import apply_multipliers
        from sith.edits.export import export_model
        from sith.edits.plan import plan_edit
        from sith.edits.spec import EditSpec

        spec = EditSpec.from_dict({"model": loaded.name,
                                   "operations": [{"concepts": [concepts[0]], "action": "suppress"}]})
        with watch.phase("edit plan", args.device), torch.no_grad():
            plan = plan_edit(analyzer, spec)
        peaks["edit plan"] = peak_rss_mb()
        with watch.phase("apply+export", args.device), torch.no_grad():
            edited = apply_multipliers(loaded.model, plan.multipliers, plan.decomposition)
            export_model(edited, args.scratch / "edited", plan.manifest(), getattr(loaded, "config", None))
        peaks["apply+export"] = peak_rss_mb()
    except Exception as exc:  # the edits API is someone else's and may move; report, don't hide
        edit_error = f"{type(exc).__name__}: {exc}"
    params = sum(p.numel() for p in loaded.model.parameters())
    print(json.dumps({
        "phases": {k: {"wall": t.wall, "cpu": t.cpu} for k, t in watch.phases.items()},
        "peak_rss_mb": peaks, "edit_error": edit_error, "machine": machine(),
        "work": {"svd": info.layers * info.heads * info.width * info.head_dim ** 2,
                 # COMP of the last four layers' vectors plus the tower-wide atom statistics the
                 # confidence needs (both poles of every vector of every layer against every atom)
                 "comp": (4 + 2 * info.layers) * info.heads * info.head_dim * args.concepts * info.output_dim,
                 "params": params},
        "shape": {"layers": info.layers, "heads": info.heads, "width": info.width, "head_dim": info.head_dim,
                  "output_dim": info.output_dim, "params": params},
        "memo_entries": len(process_memo()),
    }))


def main() -> None:
    from _common import ChildFailed, run_child
    from bench_explain import prepare_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sith-bench"))
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(args.workdir)
    results = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        folder = prepare_folder(model, workdir)
        with tempfile.TemporaryDirectory(dir=workdir) as scratch:
            command = ["--folder", str(folder), "--scratch", scratch, "--concepts", str(args.concepts),
                       "--device", args.device, "--threads", str(args.threads)]
            start = time.perf_counter()
            try:
                result = run_child(Path(__file__).resolve(), command, env=dict(os.environ, SITH_DATA_DIR=scratch))
            except ChildFailed as exc:
                print(f"{model}: {exc}")
                continue
        results[model] = result
        results[model]["process_wall"] = time.perf_counter() - start
    if not results:
        raise SystemExit("no model ran")
    first = next(iter(results.values()))
    print(first["machine"])
    print(f"{args.concepts} concepts for every model, device {args.device}; seconds CPU/wall; "
          "'per work' = (time / work unit) relative to the first model")
    units = {"load": "params", "dictionary": None, "decompose": "svd", "explain": "comp", "edit plan": "svd",
             "apply+export": "params"}
    print(f"{'model':>10} {'phase':>18} {'CPU s':>8} {'wall s':>8} {'per work':>9} {'peak RSS MB':>12}")
    for model, r in results.items():
        for phase, t in r["phases"].items():
            unit = units.get(phase)
            rel = ""
            if unit:
                base = first["phases"].get(phase)
                if base:
                    rel = f"{(t['cpu'] / r['work'][unit]) / (base['cpu'] / first['work'][unit]):.2f}"
            print(f"{model:>10} {phase:>18} {t['cpu']:8.2f} {t['wall']:8.2f} {rel:>9} "
                  f"{r['peak_rss_mb'].get(phase, float('nan')):12.0f}")
        if r["edit_error"]:
            print(f"{model:>10} {'edit':>18} failed: {r['edit_error']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"benchmark": "scaling", "results": results}, indent=2))


if __name__ == "__main__":
    main()
