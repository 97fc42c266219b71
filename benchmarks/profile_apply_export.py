"""Where apply+export's time goes, per model: a phase split and a cProfile of the real edit path.

Diagnoses bench_scaling's apply+export row (1.49× per parameter at ViT-L-14 vs ViT-B-32 in one run).
For each model (random init, seed 0, the folder bench_explain.prepare_folder writes), one process:
load, a small dictionary (``--concepts``), the same one-concept suppress plan bench_scaling makes, then
apply+export timed in steps (CPU s, one thread) — deep copy, head rewrites (counted), state-dict
gather, safetensors serialisation + write, header canonicalisation — and once more under cProfile.
Each step is divided by its own unit of work: parameters for copy/gather/write, rewritten heads ×
d·dh² for the head rewrites (a pinv of a d×dh factor per head). The memory floor — a clone of every
parameter into fresh memory plus writing the file's bytes — is measured in the same process: on
the benchmark VM, copying into freshly faulted memory costs more per byte for larger models
(glibc returns big freed blocks to the OS, so each copy page-faults again), and apply+export is
compared against that floor as well as per parameter.

    nice .venv/bin/python benchmarks/profile_apply_export.py --models ViT-B-32,ViT-L-14
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def child(args: argparse.Namespace) -> None:
    import torch
    from _common import setup

    setup(args.threads)
    from sith.edits import apply as apply_mod
    from sith.edits.apply import apply_multipliers
    from sith.edits.export import canonical_header, export_model
    from sith.edits.plan import plan_edit
    from sith.edits.spec import EditSpec
    from sith.engine.analysis import Analyzer
    from sith.engine.dictionary import build_dictionary, default_vocabulary
    from sith.engine.models import load_model

    loaded = load_model(str(args.folder))
    concepts = default_vocabulary()[: args.concepts]
    dictionary = build_dictionary(loaded, concepts, cache_dir=args.scratch / "dictionaries")
    analyzer = Analyzer(loaded, dictionary)
    spec = EditSpec.from_dict({"model": loaded.name, "operations": [{"concepts": [concepts[0]], "action": "suppress"}]})
    with torch.no_grad():
        plan = plan_edit(analyzer, spec)
    info = loaded.info
    params = sum(p.numel() for p in loaded.model.parameters())
    steps: dict[str, float] = {}

    def clock(name, fn):
        c0 = time.process_time()
        out = fn()
        steps[name] = steps.get(name, 0.0) + time.process_time() - c0
        return out

    rewritten = [0]
    original = apply_mod.rewrite_head

    def counting(*a, **k):
        rewritten[0] += 1
        c0 = time.process_time()
        original(*a, **k)
        steps["head rewrites"] = steps.get("head rewrites", 0.0) + time.process_time() - c0

    out = args.scratch / "edited"
    with torch.no_grad():
        c0 = time.process_time()
        edited = apply_multipliers(loaded.model, plan.multipliers, plan.decomposition)
        steps["apply (total)"] = time.process_time() - c0
        c0 = time.process_time()
        export_model(edited, out, plan.manifest(), getattr(loaded, "config", None))
        steps["export (total)"] = time.process_time() - c0
        # The same steps one by one.
        clock("deepcopy", lambda: copy.deepcopy(loaded.model))
        apply_mod.rewrite_head = counting
        try:
            apply_multipliers(loaded.model, plan.multipliers, plan.decomposition)
        finally:
            apply_mod.rewrite_head = original
        state = clock("state dict gather", lambda: {n: t.detach().cpu().contiguous()
                                                    for n, t in edited.state_dict().items()})
        from safetensors.torch import save_file
        target = args.scratch / "probe.safetensors"
        clock("safetensors save_file", lambda: save_file(state, str(target), metadata={"a": "1", "b": "2"}))
        clock("canonical_header", lambda: canonical_header(target))
        size = target.stat().st_size
        # Serialisation alone (no file): safetensors' in-memory form.
        from safetensors.torch import save as save_bytes
        clock("safetensors serialise (memory)", lambda: len(save_bytes(state)))
        clock("write bytes (no serialise)", lambda: _write(args.scratch / "raw.bin", size))
        prof = cProfile.Profile()
        prof.enable()
        edited2 = apply_multipliers(loaded.model, plan.multipliers, plan.decomposition)
        export_model(edited2, args.scratch / "edited2", plan.manifest(), getattr(loaded, "config", None))
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
    print(json.dumps({"model": args.folder.name, "params": params, "layers": info.layers, "heads": info.heads,
                      "width": info.width, "head_dim": info.head_dim, "rewritten_heads": rewritten[0],
                      "file_bytes": size, "steps": steps, "profile": text.getvalue()}))


def _write(path: Path, size: int) -> int:
    block = bytes(16 << 20)
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return size


def main() -> None:
    from bench_explain import prepare_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sith-bench"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for name in args.models.split(","):
        folder = prepare_folder(name, Path(args.workdir))
        with tempfile.TemporaryDirectory(prefix="sith-prof-") as scratch:
            done = subprocess.run([sys.executable, __file__, "--child", "--folder", str(folder), "--scratch", scratch,
                                   "--concepts", str(args.concepts), "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        print(f"\n== {row['model']}: {row['params'] / 1e6:.0f} M params, {row['rewritten_heads']} heads rewritten, "
              f"file {row['file_bytes'] / 2**20:.0f} MiB")
        for step, seconds in row["steps"].items():
            unit = (row["rewritten_heads"] * row["width"] * row["head_dim"] ** 2 if step == "head rewrites"
                    else row["params"])
            base_unit = (base["rewritten_heads"] * base["width"] * base["head_dim"] ** 2 if step == "head rewrites"
                         else base["params"])
            per = (seconds / unit) / (base["steps"][step] / base_unit) if base["steps"].get(step) and unit else float("nan")
            print(f"  {step:32s} {seconds:8.3f} CPU s   per work vs {base['model']}: {per:.2f}")
        floor = row["steps"]["deepcopy"] + row["steps"]["write bytes (no serialise)"]
        total = row["steps"]["apply (total)"] + row["steps"]["export (total)"]
        base_floor = base["steps"]["deepcopy"] + base["steps"]["write bytes (no serialise)"]
        base_total = base["steps"]["apply (total)"] + base["steps"]["export (total)"]
        print(f"  apply+export {total:.2f} CPU s; memory floor (clone every parameter + write the file's bytes) "
              f"{floor:.2f} s; apply+export / floor {total / floor:.2f} (vs {base['model']}: "
              f"{(total / floor) / (base_total / base_floor):.2f}); per parameter vs {base['model']}: "
              f"apply+export {(total / row['params']) / (base_total / base['params']):.2f}, "
              f"floor {(floor / row['params']) / (base_floor / base['params']):.2f}")
        print(row["profile"])


if __name__ == "__main__":
    main()
