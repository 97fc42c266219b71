"""Per-head W_VO SVD: thin-QR factor SVD (sith) vs dense torch.linalg.svd, on random-init ViT-L-14.

Both sides start from the block weights: the baseline builds the dense d×d W_VO per head (what a
dense implementation must do) and runs torch.linalg.svd on it; sith runs ``decompose_layer``.
Run: ``nice .venv/bin/python benchmarks/bench_svd.py [--model ViT-L-14] [--layers N]``
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from sith.engine.decomposition import decompose_layer, vo_factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--layers", type=int, default=None, help="first N layers only (default all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    blocks = list(model.visual.transformer.resblocks)[: args.layers]
    heads = blocks[0].attn.num_heads
    print(f"{args.model}: {len(blocks)} layers x {heads} heads, width {blocks[0].attn.embed_dim}, "
          f"head_dim {blocks[0].attn.head_dim}, threads {torch.get_num_threads()}")

    with torch.no_grad():
        decompose_layer(blocks[0], heads, 0)  # warm-up (LAPACK init)
        start = time.perf_counter()
        ours = [decompose_layer(block, heads, i).S for i, block in enumerate(blocks)]
        t_ours = time.perf_counter() - start

        start = time.perf_counter()
        dense_s = []
        for block in blocks:
            w_v, w_o = vo_factors(block, heads)
            for h in range(heads):
                _, s, _ = torch.linalg.svd(w_v[h] @ w_o[h], full_matrices=False)
                dense_s.append(s[: w_v.shape[2]])
        t_dense = time.perf_counter() - start

    ours_s = torch.cat(ours)
    dense = torch.stack(dense_s)
    diff = (ours_s - dense).abs().max().item()
    rel = diff / dense.max().item()
    n = len(blocks) * heads
    print(f"factor-QR SVD : {t_ours:8.3f} s  ({1000 * t_ours / n:.2f} ms/head)")
    print(f"dense SVD     : {t_dense:8.3f} s  ({1000 * t_dense / n:.2f} ms/head)")
    print(f"speed-up      : {t_dense / t_ours:8.1f}x   (target >= 20x)")
    print(f"max |sigma diff| = {diff:.3e} (relative to the largest sigma: {rel:.3e}) over {n} heads")


if __name__ == "__main__":
    main()
