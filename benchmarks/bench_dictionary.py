"""Dictionary encoding: cut context (sith.encode_texts) vs open_clip's encode_text on all 77 tokens.

Random-init ViT-B-32 text tower, the first N default-vocabulary concepts, same batch size on both
sides. Run: ``nice .venv/bin/python benchmarks/bench_dictionary.py [--concepts 2000]``
"""

from __future__ import annotations

import argparse
import time

import torch

from sith.engine.dictionary import default_vocabulary, encode_texts
from sith.engine.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--concepts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    texts = default_vocabulary()[: args.concepts]
    tokens = loaded.tokenizer(texts)
    lengths = tokens.argmax(dim=-1) + 1
    print(f"{args.model} text tower, {len(texts)} concepts, tokens incl. SOT/EOT: "
          f"mean {lengths.float().mean():.2f}, max {lengths.max()} (full context {tokens.shape[1]})")

    with torch.no_grad():
        encode_texts(loaded, texts[:8])  # warm-up
        start = time.perf_counter()
        cut = encode_texts(loaded, texts, batch_size=args.batch_size)
        t_cut = time.perf_counter() - start

        start = time.perf_counter()
        full = torch.cat([loaded.model.encode_text(tokens[i : i + args.batch_size])
                          for i in range(0, len(texts), args.batch_size)])
        t_full = time.perf_counter() - start

    diff = (cut - full).abs().max().item()
    print(f"cut context   : {t_cut:8.3f} s")
    print(f"full 77 tokens: {t_full:8.3f} s")
    print(f"speed-up      : {t_full / t_cut:8.1f}x   (target >= 3x)")
    print(f"max |diff|    = {diff:.3e}   (target < 1e-5)")


if __name__ == "__main__":
    main()
