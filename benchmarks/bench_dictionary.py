"""Dictionary encoding: cut context (sith.encode_texts) vs open_clip's encode_text on all 77 tokens.

Random-init ViT-B-32 text tower, the first N default-vocabulary concepts, same batch size on both
sides; on a GPU also half-precision (autocast) encoding. CPU time on the CPU, wall on a GPU.
Run: ``nice .venv/bin/python benchmarks/bench_dictionary.py [--concepts 2000]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, setup, timed  # noqa: E402

from sith.engine.dictionary import default_vocabulary, encode_texts  # noqa: E402
from sith.engine.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    setup(args.threads, args.device)
    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device)
    print(machine())
    texts = default_vocabulary()[: args.concepts]
    tokens = loaded.tokenizer(texts)
    lengths = tokens.argmax(dim=-1) + 1
    print(f"{args.model} text tower, {len(texts)} concepts, tokens incl. SOT/EOT: "
          f"mean {lengths.float().mean():.2f}, max {lengths.max()} (full context {tokens.shape[1]})")

    with torch.no_grad():
        encode_texts(loaded, texts[:8])  # warm-up
        cut, t_cut = timed(lambda: encode_texts(loaded, texts, batch_size=args.batch_size), args.device)
        device_tokens = tokens.to(args.device)
        full, t_full = timed(lambda: torch.cat([loaded.model.encode_text(device_tokens[i : i + args.batch_size]).cpu()
                                                for i in range(0, len(texts), args.batch_size)]), args.device)
        half = None
        if args.device.startswith("cuda"):
            half, t_half = timed(lambda: encode_texts(loaded, texts, precision="fp16"), args.device)

    unit = "wall" if args.device.startswith("cuda") else "CPU"
    diff = (cut - full).abs().max().item()
    print(f"cut context   : {t_cut.best(args.device):8.3f} s {unit} ({t_cut.wall:.3f} s wall)")
    print(f"full 77 tokens: {t_full.best(args.device):8.3f} s {unit} ({t_full.wall:.3f} s wall)")
    print(f"speed-up      : {t_full.best(args.device) / t_cut.best(args.device):8.1f}x   (target >= 3x)")
    print(f"max |diff|    = {diff:.3e}   (target < 1e-5)")
    if half is not None:
        cos = torch.nn.functional.cosine_similarity(half, cut).min().item()
        speed = t_cut.best(args.device) / t_half.best(args.device)
        print(f"fp16 autocast : {t_half.best(args.device):8.3f} s -> {speed:.2f}x "
              f"fp32 cut context; min cosine to fp32 {cos:.5f}")
    else:
        print("fp16 autocast : not run (needs a CUDA device)")


if __name__ == "__main__":
    main()
