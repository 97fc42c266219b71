"""One ``EmbedImages`` call with 32 encoded 224-px images against in-process open_clip on the same batch.

A real server (in this process, real Redis or an embedded one, auth off) serves a random-init
ViT-B-32 (seed 0, saved as an open_clip folder; weights do not change timings). The batch: 32
synthetic 224×224 photos-like images (smooth colour fields plus noise), half PNG and half JPEG
(quality 90), ~40-100 KB each. Alternating, after warm-up, ``--repeats`` times each:

* in-process: what a user holding those files does with open_clip — PIL decode, open_clip's eval
  transform, ``torch.stack``, ``model.encode_image(normalize=True)`` under ``inference_mode`` (the
  same model object the server holds);
* service: ``sith_client.Client.embed_images(list_of_bytes)`` over loopback gRPC (the SDK sends
  the bytes as they are; the server checks headers against the pixel budget, decodes, preprocesses
  and encodes the batch in one forward pass).

Target (issue 16, 5): service ≤ 1.2× in-process (medians; CPU seconds of this process are the
figure of record on a shared CPU — both sides run in it — with wall time printed next to them).
The embeddings are compared too (max |difference|).

    nice .venv/bin/python benchmarks/bench_embed_images.py [--repeats 15] [--record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))
                         for _ in range(3)], axis=-1)
        pixels = np.clip(127.5 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG" if i % 2 == 0 else "JPEG",
                                            **({} if i % 2 == 0 else {"quality": 90}))
        out.append(buffer.getvalue())
    return out


def main() -> None:
    from _common import machine, report, setup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sith-bench"))
    parser.add_argument("--redis", default=os.environ.get("SITH_TEST_REDIS_URL", "redis://127.0.0.1:6379/5"))
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    setup(args.threads)

    import open_clip
    import torch
    from bench_explain import prepare_folder
    from PIL import Image

    import sith_client
    from sith_server.app import build
    from sith_server.config import ServerConfig
    from sith_workers.connection import connect
    from sith_workers.embedded import EmbeddedRedis

    folder = prepare_folder(args.model, Path(args.workdir))
    images = make_images(args.batch, 224)
    redis_url, embedded = args.redis, None
    try:
        connect(redis_url, connect_timeout=0.5, retries=0).ping()
    except Exception:  # noqa: BLE001 - any failure: an embedded Redis instead
        embedded = EmbeddedRedis().start()
        redis_url = embedded.url
    prefix = f"benchembed-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="sith-bench-embed-") as tmp:
        config = ServerConfig(grpc_address="127.0.0.1:0", metrics_port=0, redis_url=redis_url, auth_disabled=True,
                              models=(str(folder),), data_dir=Path(tmp) / "data")
        server = build(config, prefix=prefix).start()
        try:
            model = server.deps.runtime.default.loaded.model
            size = model.visual.image_size
            preprocess = open_clip.image_transform(size, is_train=False)

            def in_process() -> torch.Tensor:
                batch = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
                with torch.inference_mode():
                    return model.encode_image(batch, normalize=True)

            with sith_client.Client(f"127.0.0.1:{server.port}", timeout=600) as client:
                def service() -> torch.Tensor:
                    return torch.as_tensor(client.embed_images(images).vectors)

                runs = {"in-process open_clip": in_process, "service (one EmbedImages call)": service}
                results = {k: fn() for k, fn in runs.items()}          # warm-up (and the accuracy check)
                for fn in runs.values():
                    fn()
                diff = float((results["in-process open_clip"] - results["service (one EmbedImages call)"]).abs().max())
                wall: dict[str, list[float]] = {k: [] for k in runs}
                cpu: dict[str, list[float]] = {k: [] for k in runs}
                for _ in range(args.repeats):
                    for label, fn in runs.items():
                        w0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        wall[label].append(time.perf_counter() - w0)
                        cpu[label].append(time.process_time() - c0)
        finally:
            server.stop(grace=1)
            client_redis = connect(redis_url)
            for key in client_redis.scan_iter(match=f"{prefix}:*", count=1000):
                client_redis.delete(key)
            if embedded is not None:
                embedded.stop()

    kb = sum(len(b) for b in images) / 1024
    base, svc = "in-process open_clip", "service (one EmbedImages call)"
    ratio_cpu = statistics.median(cpu[svc]) / statistics.median(cpu[base])
    ratio_wall = statistics.median(wall[svc]) / statistics.median(wall[base])
    lines = [
        f"## Embeddings of encoded images (bench_embed_images.py) — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}. Random-init {args.model} (seed 0), {args.batch} encoded 224×224 images "
        f"(half PNG, half JPEG q90; {kb:,.0f} KB in all), server in this process on 127.0.0.1, "
        f"{args.repeats} alternating runs after warm-up.",
        "",
        "| path | CPU s (median) | wall s (median) | wall s (best) |",
        "|---|---|---|---|",
    ]
    for label in runs:
        lines.append(f"| {label} | {statistics.median(cpu[label]):.3f} | {statistics.median(wall[label]):.3f} | "
                     f"{min(wall[label]):.3f} |")
    lines += ["", f"Service / in-process: **{ratio_cpu:.2f}×** CPU, {ratio_wall:.2f}× wall (target ≤ 1.2×: "
              f"{'met' if ratio_cpu <= 1.2 else 'MISSED'}); max |embedding difference| {diff:.1e}.", ""]
    report("\n".join(lines), args.record)


if __name__ == "__main__":
    main()
