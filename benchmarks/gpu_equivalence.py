"""The GPU path gives the CPU's answers: decomposition, explanations, the default edit, edited embeddings.

Runs the same in-process calls (``sith.load(..., device=...)``) on the CPU and on a GPU for one
testbed model and compares what a user sees:

* σ of every head of every layer (max |Δσ| / σ_max);
* the COMP explanation of every singular vector of the last layer (identical concept lists);
* the default edit ``edit(suppress=["red"])``: its α and its write maps (max |Δα|) and the plan's
  predicted presence;
* the edited model's image embeddings of 256 testbed images (min cosine CPU vs GPU), and the
  zero-shot recall of red before and after on both devices.

Each phase is timed on both devices (wall clock, synchronised). Exits non-zero when an answer differs
beyond float32 tolerance, so a GPU session can use it as a check:

    python benchmarks/gpu_equivalence.py [--model testbed-main] [--device cuda] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stopwatch  # noqa: E402

SIGMA_TOLERANCE = 1e-4  # max |Δσ| / σ_max, float32 QR on two devices
ALPHA_TOLERANCE = 1e-3
COSINE_FLOOR = 0.9999


def run_on(model_name: str, device: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Everything a user asks of one device, with wall times per phase."""
    import sith
    from sith.testbed import evaluate as ev

    watch = Stopwatch()
    with watch.phase("load", device):
        model = sith.load(model_name, device=device, cache=False)
    with watch.phase("decompose", device):
        decomposition = model.analyzer.decomposition()
    sigma = {layer: svd.S.detach().float().cpu() for layer, svd in decomposition.items()}
    with watch.phase("explain last layer", device):
        explanation = model.explain(layers=[-1], vectors=64)
    concepts = [[c for c, _ in vector.concepts] for head in explanation.items for vector in head.vectors]
    with watch.phase("plan + apply suppress red", device):
        edited = model.edit(suppress=["red"])
    multipliers = edited.multipliers
    alphas = {layer: values.detach().float().cpu() for layer, values in multipliers.values.items()}
    maps = [(m.writer, float(m.alpha)) for m in multipliers.maps]
    heads = ev.class_embeddings(model.model, model.tokenizer, ev.prompts("colour"))
    red = list(ev.FACTORS["colour"]).index("red")

    def embed(clip):
        return ev.encode_images(clip, images.to(device) if device != "cpu" else images, 128).float().cpu()

    with watch.phase("embed the images (base)", device):
        base = embed(model.model)
    with watch.phase("embed the images (edited)", device):
        after = embed(edited.model)

    def recall(features: torch.Tensor) -> float:
        predicted = (F.normalize(features, dim=-1) @ heads.float().cpu().T).argmax(-1)
        mask = labels == red
        return float((predicted[mask] == red).float().mean())

    times = {name: t.wall for name, t in watch.phases.items()}
    return {"device": device, "times": times, "sigma": sigma, "concepts": concepts, "alphas": alphas,
            "maps": maps, "base": base, "after": after, "recall_red": [recall(base), recall(after)]}


def compare(cpu: dict, gpu: dict) -> dict:
    sigma = max(float((cpu["sigma"][k] - gpu["sigma"][k]).abs().max() / cpu["sigma"][k].max()) for k in cpu["sigma"])
    same = sum(a == b for a, b in zip(cpu["concepts"], gpu["concepts"]))
    alpha = max(float((cpu["alphas"][k] - gpu["alphas"][k]).abs().max()) for k in cpu["alphas"])
    writers_equal = [w for w, _ in cpu["maps"]] == [w for w, _ in gpu["maps"]]
    map_alpha = max((abs(a - b) for (_, a), (_, b) in zip(cpu["maps"], gpu["maps"])), default=0.0)
    cos_base = float(F.cosine_similarity(cpu["base"], gpu["base"]).min())
    cos_after = float(F.cosine_similarity(cpu["after"], gpu["after"]).min())
    return {
        "sigma_max_rel_diff": sigma,
        "explanations_identical": f"{same}/{len(cpu['concepts'])}",
        "alpha_max_diff": alpha,
        "write_maps": {"cpu": len(cpu["maps"]), "gpu": len(gpu["maps"]), "same_writers": writers_equal,
                       "alpha_max_diff": map_alpha},
        "embedding_min_cosine": {"base": cos_base, "edited": cos_after},
        "recall_red": {"cpu": cpu["recall_red"], "gpu": gpu["recall_red"]},
        "seconds": {"cpu": cpu["times"], "gpu": gpu["times"]},
        "ok": (sigma <= SIGMA_TOLERANCE and same == len(cpu["concepts"]) and writers_equal
               and max(alpha, map_alpha) <= ALPHA_TOLERANCE and min(cos_base, cos_after) >= COSINE_FLOOR),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed-main")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    from sith.testbed.world import HELDOUT_SEED, NATURAL, make_batch, sample

    batch = make_batch([sample(NATURAL, HELDOUT_SEED + 5, i) for i in range(args.images)])
    labels = batch.labels["colour"]
    cpu = run_on(args.model, "cpu", batch.images, labels)
    gpu = run_on(args.model, args.device, batch.images, labels)
    result = {"model": args.model, "device": args.device,
              "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "torch": torch.__version__, **compare(cpu, gpu)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
