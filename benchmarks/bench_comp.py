"""COMP throughput at paper scale: every right singular vector of ViT-L-14's last four layers
(4 x 16 heads x 64 = 4,096 vectors, joint dim 768) against a 50,000-atom dictionary, K = 5.

Target: COMP under 60 s on a 2-core CPU. NNOMP (same greedy loop, λ = 0), top-k (one matmul +
NNLS) and matching pursuit run on the same inputs, and the ratios against top-k (the cheapest
method: a single score matmul) are printed so the numbers carry over between machines.

    nice .venv/bin/python benchmarks/bench_comp.py [--atoms 50000] [--k 5] [--device cpu]

The model is randomly initialised (no pretrained weights here); the atoms are random unit vectors.
Neither changes the cost: it depends on the shapes only.
"""

from __future__ import annotations

import argparse
import time

import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup  # noqa: E402

from sith.engine.decomposition import decompose_layer  # noqa: E402
from sith.engine.jointspace import JointSpace  # noqa: E402
from sith.engine.sparse import encode  # noqa: E402


def targets_from_vit_l14(device: str) -> torch.Tensor:
    """Joint-space targets of ViT-L-14's last four layers (random init), no image mean."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14").eval()
    visual = model.visual
    heads = visual.transformer.resblocks[0].attn.num_heads
    space = JointSpace(visual.ln_post, visual.proj, None)
    vectors = []
    for layer in range(len(visual.transformer.resblocks) - 4, len(visual.transformer.resblocks)):
        svd = decompose_layer(visual.transformer.resblocks[layer], heads, layer)
        vectors.append(svd.V.transpose(1, 2).reshape(-1, svd.V.shape[1]))
    return space.map(torch.cat(vectors)).to(device)


def timed(method: str, targets: torch.Tensor, atoms: torch.Tensor, k: int) -> float:
    if targets.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    encode(method, targets, atoms, k=k, coherence=0.3)
    if targets.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup(args.threads, args.device)
    print(machine())

    targets = targets_from_vit_l14(args.device)
    generator = torch.Generator().manual_seed(1)
    atoms = F.normalize(torch.randn(args.atoms, targets.shape[1], generator=generator), dim=1).to(args.device)
    encode("topk", targets[:2048], atoms, k=args.k)  # warm-up: first touch of the big score buffers

    print(f"{targets.shape[0]} vectors, {args.atoms} atoms x {targets.shape[1]}-d, K={args.k}, "
          f"device={args.device}, torch threads={torch.get_num_threads()}")
    baseline = timed("topk", targets, atoms, args.k)
    for method in ("topk", "mp", "nnomp", "comp"):
        seconds = baseline if method == "topk" else timed(method, targets, atoms, args.k)
        print(f"{method:>6}: {seconds:7.2f} s  {targets.shape[0] / seconds:8.0f} vectors/s  "
              f"{seconds / baseline:5.2f}x top-k")


if __name__ == "__main__":
    main()
