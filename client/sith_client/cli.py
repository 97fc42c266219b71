"""``sith-client``: the SDK from a shell (argparse only, so the SDK stays dependency-light).

    sith-client models
    sith-client explain --layers -1 --k 5
    sith-client find red --top 10
    sith-client edit --suppress red --download out.safetensors
    sith-client embed-text "a red square" --out emb.npy

Errors print one line (with suggestions) on stderr and set the exit status:
2 bad input, 3 not found, 4 auth, 5 unavailable, 6 timed out, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from sith_api.v1 import sith_pb2 as pb

from . import __version__, errors
from .client import Client
from .jobs import Edit, Job
from .types import ACTIONS, EditOp

EXIT_CODES: list[tuple[type[errors.SithError], int]] = [
    (errors.InvalidArgument, 2),
    (errors.NotFound, 3),
    (errors.Unauthenticated, 4),
    (errors.PermissionDenied, 4),
    (errors.Unavailable, 5),
    (errors.DeadlineExceeded, 6),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        client = Client(args.address, token=args.token, tls=args.tls or None,
                        root_certificates=args.root_certs, server_name=args.server_name, timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            out = args.func(client, args)
    except errors.SithError as exc:
        return _report(exc)
    except (ValueError, OSError) as exc:  # local problems: bad flag combination, unreadable file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if out is not None:
        _print(out)
    return 0


def _report(exc: errors.SithError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    if isinstance(exc, errors.InvalidArgument):
        for fv in exc.field_violations:
            line = f"{fv.field}: {fv.description}"
            if line not in str(exc):
                print(f"  {line}", file=sys.stderr)
    elif exc.suggestions:
        print(f"  did you mean: {', '.join(exc.suggestions)}", file=sys.stderr)
    if isinstance(exc, errors.Unauthenticated):
        print("  pass --token or set SITH_TOKEN", file=sys.stderr)
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 1)


# --- commands ----------------------------------------------------------------------------------


def cmd_models(c: Client, a: argparse.Namespace) -> Any:
    models = c.models()
    if a.json:
        return models
    for m in models:
        star = "*" if m.is_default else " "
        print(f"{star} {m.name:<24} {m.hash[:12]}  layers={m.layers} heads={m.heads} width={m.width} "
              f"dim={m.output_dim} image={m.image_size}")
    return None


def cmd_explain(c: Client, a: argparse.Namespace) -> Any:
    result = c.explain(a.model, layers=a.layers, heads=a.heads, method=a.method, k=a.k,
                       coherence=a.coherence, timeout=a.wait_timeout, progress=not a.json)
    if a.json:
        return result
    for h in result.heads:
        theme = ", ".join(x.name for x in h.theme[:5])
        print(f"L{h.layer} H{h.head}" + (f"  theme: {theme}" if theme else ""))
        for v in h.vectors[: a.vectors]:
            concepts = ", ".join(f"{x.name} {x.score:.2f}" for x in v.concepts)
            print(f"  #{v.index:<3} σ={v.sigma:7.3f}  {concepts}")
    return None


def cmd_find(c: Client, a: argparse.Namespace) -> Any:
    result = c.find(a.concepts, model=a.model, layers=a.layers, top=a.top, timeout=a.wait_timeout,
                    progress=not a.json)
    if a.json:
        return result
    for h in result.hits:
        concepts = ", ".join(x.name for x in h.concepts[:5])
        print(f"L{h.layer:<3} H{h.head:<3} #{h.index:<4} score={h.score:.3f} σ={h.sigma:.3f}  {concepts}")
    return None


def _edit_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(suppress=a.suppress, amplify=a.amplify, flip=a.flip, scale=a.scale, debias=a.debias,
                strength=a.strength, layers=a.layers, top_n=a.top_n, threshold=a.threshold, operator=a.operator,
                target=a.target, preserve=a.preserve, anchor=a.anchor,
                operations=[EditOp(**op) for op in json.loads(a.operations)] if a.operations else None)


def cmd_preview(c: Client, a: argparse.Namespace) -> Any:
    plan = c.preview_edit(a.model, **_edit_kwargs(a), timeout=a.wait_timeout, progress=not a.json)
    if a.json:
        return plan
    heads = {(v.layer, v.head) for v in plan.affected}
    print(f"{len(plan.affected)} singular vectors in {len(heads)} heads would change:")
    for v in plan.affected:
        op = f" [{v.operator}]" if v.operator else ""
        print(f"  L{v.layer} H{v.head} #{v.index}: α={v.alpha:g} relevance={v.relevance:.3f}{op}  "
              f"{', '.join(x.name for x in v.concepts[:4])}")
    for e in plan.predicted:
        print(f"  {e.role} {e.concept}: {e.before:.3f} -> {e.after:.3f}")
    for w in plan.warnings:
        print(f"  warning: {w}")
    return None


def cmd_edit(c: Client, a: argparse.Namespace) -> Any:
    edit = c.edit(a.model, **_edit_kwargs(a))
    print(f"created {edit.name}", file=sys.stderr)
    if a.no_wait and not a.download:
        return edit if a.json else print(edit.name)
    edit = c.wait(edit, timeout=a.wait_timeout, progress=not a.json)
    if a.download:
        path = c.download(edit, a.download)
        print(f"wrote {path}", file=sys.stderr)
    return edit if a.json else print(f"{edit.name} {edit.state}")


def cmd_edits(c: Client, a: argparse.Namespace) -> Any:
    edits = list(c.edits())
    if a.json:
        return edits
    for e in edits:
        print(f"{e.name:<60} {e.state:<8} {_operations(e)}")
    return None


def _operations(e: Edit) -> str:
    return "; ".join(f"{pb.EditOperation.Action.Name(op.action).lower()} {','.join(op.concepts)}"
                     for op in e.spec.operations)


def cmd_get_edit(c: Client, a: argparse.Namespace) -> Any:
    e = c.get_edit(a.edit)
    if a.json:
        return e
    print(f"{e.name}  {e.state}  {_operations(e)}")
    if e.plan is not None:
        print(f"  {len(e.plan.affected)} vectors rescaled; {len(e.plan.warnings)} warnings")
    if e.artifact is not None:
        print(f"  checkpoint: {e.artifact.filename} ({e.artifact.size_bytes} bytes, sha256 {e.artifact.sha256[:12]})")
    if e.error is not None:
        print(f"  error: {e.error}")
    return None


def cmd_download(c: Client, a: argparse.Namespace) -> Any:
    path = c.download(a.edit, a.path)
    print(path)
    return None


def cmd_delete(c: Client, a: argparse.Namespace) -> Any:
    c.delete_edit(a.edit)
    return None


def _save_or_print(emb: np.ndarray, a: argparse.Namespace) -> Any:
    if a.out:
        np.save(a.out, emb)
        print(f"wrote {a.out} {list(emb.shape)}", file=sys.stderr)
        return None
    if a.json:
        return emb.tolist()
    np.set_printoptions(precision=4, suppress=True, threshold=64, edgeitems=4)
    print(emb)
    return None


def cmd_embed_text(c: Client, a: argparse.Namespace) -> Any:
    return _save_or_print(c.embed_texts(a.texts, model=a.model, edit=a.edit, normalize=not a.raw).vectors, a)


def cmd_embed_image(c: Client, a: argparse.Namespace) -> Any:
    return _save_or_print(c.embed_images(a.images, model=a.model, edit=a.edit, normalize=not a.raw).vectors, a)


def cmd_classify(c: Client, a: argparse.Namespace) -> Any:
    r = c.classify(a.images, a.labels, model=a.model, edit=a.edit, template=a.template or "")
    if a.json:
        return {"labels": list(r.labels), "predicted": list(r.predicted), "probabilities": r.probabilities.tolist()}
    for path, label, p in zip(a.images, r.predicted, r.probabilities):
        print(f"{path}: {label} ({p.max():.2f})")
    return None


def cmd_job(c: Client, a: argparse.Namespace) -> Any:
    job = c.job(a.name)
    if a.cancel:
        job = c.cancel(job)
    elif a.wait:
        job = c.wait(job, timeout=a.wait_timeout, progress=not a.json)
    return job if a.json else print(f"{job.name} {job.kind} {job.state} {job.progress:.0%} {job.message}")


# --- parser ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sith-client", description="Client for the SITH CLIP-editing service.")
    p.add_argument("--version", action="version", version=f"sith-client {__version__}")
    g = p.add_argument_group("connection")
    g.add_argument("--address", help="host:port (default $SITH_ADDRESS or localhost:50051)")
    g.add_argument("--token", help="bearer token (default $SITH_TOKEN)")
    g.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    g.add_argument("--root-certs", metavar="PEM", help="CA bundle for TLS (implies --tls)")
    g.add_argument("--server-name", help="TLS name override")
    g.add_argument("--timeout", type=float, default=30.0, help="per-call deadline in seconds (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(metavar="COMMAND")

    def cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return sp

    def model_arg(sp: argparse.ArgumentParser, edit: bool = False) -> None:
        sp.add_argument("--model", help="model name or hash (default: the server's default)")
        if edit:
            sp.add_argument("--edit", help="embed with an edited model ('tenants/<t>/edits/<id>')")

    def wait_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--wait-timeout", type=float, default=None, help="give up waiting after N seconds")

    def ints(sp: argparse.ArgumentParser, flag: str, help: str) -> None:
        sp.add_argument(flag, type=int, nargs="+", help=help)

    cmd("models", cmd_models, "list the server's models")

    sp = cmd("explain", cmd_explain, "explain heads' singular vectors as concepts")
    model_arg(sp)
    wait_arg(sp)
    ints(sp, "--layers", "layers (negative from the end; default last four)")
    ints(sp, "--heads", "heads (default all)")
    sp.add_argument("--method", default="comp", choices=["comp", "nnomp", "topk", "mp"])
    sp.add_argument("--k", type=int, help="concepts per vector (default 5)")
    sp.add_argument("--coherence", type=float)
    sp.add_argument("--vectors", type=int, default=5, help="vectors to print per head")

    sp = cmd("find", cmd_find, "find singular vectors matching concepts")
    sp.add_argument("concepts", nargs="+")
    model_arg(sp)
    wait_arg(sp)
    ints(sp, "--layers", "layers to search")
    sp.add_argument("--top", type=int, help="hits (default 20)")

    for name, func, help in (("preview", cmd_preview, "dry-run an edit: which vectors would change"),
                             ("edit", cmd_edit, "create an edit (and optionally download the checkpoint)")):
        sp = cmd(name, func, help)
        model_arg(sp)
        wait_arg(sp)
        for action in ACTIONS:
            sp.add_argument(f"--{action}", nargs="+", metavar="CONCEPT", help=f"concepts to {action}")
        sp.add_argument("--strength", type=float, help="α for every action (suppress, debias 0..1, amplify >1, flip <0)")
        sp.add_argument("--operator", help="edit operator (sith_scale, head_project, ...; default auto)")
        sp.add_argument("--target", type=float, help="suppress, debias: presence level to reach; amplify: factor")
        sp.add_argument("--preserve", nargs="+", metavar="CONCEPT", help="concepts to protect")
        sp.add_argument("--anchor", help="concept that takes over part of what a suppress removes "
                        "(default auto: the nearest preserved neighbour; none = off)")
        ints(sp, "--layers", "layers to edit (default last four)")
        sel = sp.add_mutually_exclusive_group()
        sel.add_argument("--top-n", type=int, help="rescale the N most relevant vectors per operation")
        sel.add_argument("--threshold", type=float, help="rescale vectors with relevance above this")
        sp.add_argument("--operations", metavar="JSON",
                        help='full operations, e.g. \'[{"action": "scale", "concepts": ["red"], "strength": 0.5}]\'')
        if name == "edit":
            sp.add_argument("--download", metavar="PATH", help="wait, then save the edited checkpoint here")
            sp.add_argument("--no-wait", action="store_true", help="return as soon as the edit is created")

    cmd("edits", cmd_edits, "list your edits")
    sp = cmd("get-edit", cmd_get_edit, "show one edit")
    sp.add_argument("edit")
    sp = cmd("download", cmd_download, "download an edited checkpoint (sha256-verified)")
    sp.add_argument("edit")
    sp.add_argument("path")
    sp = cmd("delete", cmd_delete, "delete an edit")
    sp.add_argument("edit")

    for name, func, what in (("embed-text", cmd_embed_text, "texts"), ("embed-image", cmd_embed_image, "images")):
        sp = cmd(name, func, f"embed {what}")
        sp.add_argument(what, nargs="+", metavar="TEXT" if what == "texts" else "IMAGE")
        model_arg(sp, edit=True)
        sp.add_argument("--raw", action="store_true", help="do not unit-normalise")
        sp.add_argument("--out", metavar="FILE.npy", help="save the [N, D] array")

    sp = cmd("classify", cmd_classify, "zero-shot classify images")
    sp.add_argument("images", nargs="+", metavar="IMAGE")
    sp.add_argument("--labels", nargs="+", required=True)
    sp.add_argument("--template", help='prompt with "{}" (default "a photo of a {}.")')
    model_arg(sp, edit=True)

    sp = cmd("job", cmd_job, "show, wait for or cancel an operation")
    sp.add_argument("name")
    wait_arg(sp)
    grp = sp.add_mutually_exclusive_group()
    grp.add_argument("--wait", action="store_true")
    grp.add_argument("--cancel", action="store_true")
    return p


def _print(out: Any) -> None:
    print(json.dumps(_plain(out), indent=2))


def _plain(o: Any) -> Any:
    """JSON-ready data: messages in their proto JSON form (field names as in the proto)."""
    if isinstance(o, Message):
        return json_format.MessageToDict(o, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    if isinstance(o, Job):
        return _plain(o.operation)
    if isinstance(o, Edit):
        return _plain(o.message)
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return o


if __name__ == "__main__":
    sys.exit(main())
