"""Cold and warm ``sith explain``: where a user's wait goes (import, load, dictionary, SVD, COMP).

Each run is a fresh Python process doing what ``sith explain`` does, phase by phase:

* import     — ``sith.cli.analysis`` (torch, open_clip, rich, the engine);
* load       — ``load_model`` of a weights folder (open_clip layout, safetensors);
* dictionary — ``build_dictionary`` of the first N default-vocabulary concepts (disk cache);
* svd        — the data-free image mean (every layer) and the analysed layers' decomposition;
* comp       — joint-space targets and COMP codes of the last four layers, and the explanations.

Three runs share one ``SITH_DATA_DIR``: **cold** (empty caches), **warm** (everything cached: a
second ``sith explain``), and **shared-dictionary** (artifact cache off, dictionary cached: a new
vision tower over a text tower the cache already knows — a fine-tune, another worker).

The weights are random (nothing can be downloaded here) but saved to a folder first, so every run
loads the same file, as a user's would. Ratios are taken within one run of this script.

    nice .venv/bin/python benchmarks/bench_explain.py [--model ViT-B-32] [--concepts 20000]
          [--threads 1] [--device cpu|cuda] [--workdir /tmp/sith-bench] [--json out.json]
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


def prepare_folder(model_name: str, workdir: Path) -> Path:
    """A random-init (seed 0) open_clip folder for ``model_name``, written once and reused."""
    folder = workdir / f"{model_name}-random-seed0"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(model_name)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config(model_name), "preprocess_cfg": {}}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def child(args: argparse.Namespace) -> None:
    """One ``sith explain``, phase by phase; prints one JSON line."""
    t0w, t0c = time.perf_counter(), time.process_time()
    import sith.cli.analysis  # noqa: F401  (what `sith explain` imports)

    phases = {"import": {"wall": time.perf_counter() - t0w, "cpu": time.process_time() - t0c}}
    import torch

    sys.path.insert(0, str(HERE))
    from _common import Stopwatch, current_rss_mb, machine, peak_rss_mb, setup

    from sith.engine.analysis import Analyzer
    from sith.engine.cache import DiskCache, data_dir
    from sith.engine.decomposition import resolve_layers
    from sith.engine.dictionary import build_dictionary, default_vocabulary
    from sith.engine.models import load_model

    setup(args.threads, args.device)
    watch = Stopwatch()
    with watch.phase("load", args.device):
        loaded = load_model(str(args.folder), device=args.device)
    concepts = default_vocabulary(max(args.concepts, 20_000))[: args.concepts]
    with watch.phase("dictionary", args.device):
        dictionary = build_dictionary(loaded, concepts)
    cache = None if args.no_artifacts else DiskCache(data_dir() / "artifacts")
    analyzer = Analyzer(loaded, dictionary, device=args.device, cache=cache)
    layers = resolve_layers(loaded.info, None)
    with watch.phase("svd", args.device), torch.no_grad():
        analyzer.joint  # noqa: B018 - the data-free image mean: every layer's SVD
        analyzer.decomposition(layers)
    with watch.phase("comp", args.device), torch.no_grad():
        summaries = analyzer.explain(layers)
    for name, t in watch.phases.items():
        phases[name] = {"wall": t.wall, "cpu": t.cpu}
    print(json.dumps({"phases": phases, "heads": len(summaries), "peak_rss_mb": peak_rss_mb(),
                      "rss_mb": current_rss_mb(), "machine": machine(), "threads": torch.get_num_threads()}))


def run_child(args: argparse.Namespace, folder: Path, data: Path, no_artifacts: bool) -> dict:
    from _common import ChildFailed
    from _common import run_child as run_script
    command = ["--folder", str(folder), "--concepts", str(args.concepts), "--device", args.device]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if no_artifacts:
        command.append("--no-artifacts")
    start = time.perf_counter()
    try:
        result = run_script(Path(__file__).resolve(), command, env=dict(os.environ, SITH_DATA_DIR=str(data)))
    except ChildFailed as exc:
        raise SystemExit(str(exc)) from None
    result["process_wall"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concepts", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sith-bench"))
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-artifacts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    workdir = Path(args.workdir)
    folder = prepare_folder(args.model, workdir)
    with tempfile.TemporaryDirectory(dir=workdir) as data:
        runs = {
            "cold": run_child(args, folder, Path(data), no_artifacts=False),
            "warm": run_child(args, folder, Path(data), no_artifacts=False),
            "shared-dictionary": run_child(args, folder, Path(data), no_artifacts=True),
        }
    print(runs["cold"]["machine"])
    print(f"{args.model}, {args.concepts} concepts, device {args.device}, last four layers, COMP K=5; "
          f"seconds as CPU / wall")
    names = ["import", "load", "dictionary", "svd", "comp"]
    print(f"{'run':>18}  " + "  ".join(f"{n:>15}" for n in names) + f"  {'total':>15}  {'peak RSS':>9}")
    for run, result in runs.items():
        p = result["phases"]
        total_c = sum(p[n]["cpu"] for n in names)
        total_w = sum(p[n]["wall"] for n in names)
        cells = "  ".join(f"{p[n]['cpu']:7.2f}/{p[n]['wall']:7.2f}" for n in names)
        print(f"{run:>18}  {cells}  {total_c:7.2f}/{total_w:7.2f}  {result['peak_rss_mb']:7.0f} MB")
    cold, warm = runs["cold"]["phases"], runs["warm"]["phases"]
    total = lambda p: sum(p[n]["cpu"] for n in names)  # noqa: E731
    print(f"warm / cold (CPU): {total(warm) / total(cold):.3f}; dictionary share of cold: "
          f"{cold['dictionary']['cpu'] / total(cold):.0%}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"benchmark": "explain", "model": args.model,
                                                    "concepts": args.concepts, "device": args.device,
                                                    "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
