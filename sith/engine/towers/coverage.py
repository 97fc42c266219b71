"""Coverage table: which open_clip configs and transformers architectures SITH's tower adapters handle.

``python -m sith.engine.towers.coverage [--out docs/towers.md] [--check-params 120e6]`` (in docs/towers.md
the table goes between the ``coverage:start``/``coverage:end`` markers)

Every row is one architecture, built with random weights (no downloads):

1. **adapter**: the vision tower alone is built on the meta device (no memory, seconds even for
   ViT-e) and ``adapter_for`` is asked for it: family, blocks × heads × head_dim, width, joint
   dim (the readout runs on meta tensors), or the InvalidInput that names the unsupported tower;
2. **check** (towers with at most ``--check-params`` vision parameters): the real tower is built
   on the CPU and the engine's numbers are checked: the factor SVD of the last block against a
   dense SVD, α = 1 write-back (max weight change) and an α = 0 edit of one vector (the head's
   rebuilt W_VO loses exactly that σ), plus, for attention-pool (MAP) heads, the effect of the
   head's MLP on the joint map (mean cosine between the readout with and without the MLP over
   the last block's right singular vectors; random weights, so only indicative).

Text towers are not built (the HF text configs need the Hub); they do not affect the vision side.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sith.engine.errors import InvalidInput


@dataclass
class Row:
    source: str  # "open_clip" or "transformers"
    name: str
    tower: str = ""
    family: str = ""
    shape: str = ""
    status: str = ""  # works / not
    text: str = ""  # how the text tower is built (not part of the vision check)
    why: str = ""
    checks: dict = field(default_factory=dict)


class _Holder(nn.Module):
    """Just a ``visual`` attribute: what the adapters need to see a vision tower."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual


def _openclip_tower(name: str, device: str) -> nn.Module:
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = copy.deepcopy(open_clip.get_model_config(name))
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False
    with torch.device(device):
        return _Holder(_build_vision_tower(cfg["embed_dim"], vision, quick_gelu=cfg.get("quick_gelu", False)))


def _hf_models() -> dict:
    """transformers architectures (default configs = the base-size checkpoints)."""
    try:
        import transformers
    except ModuleNotFoundError:
        return {}
    out = {"CLIPModel (clip)": lambda: transformers.CLIPModel(transformers.CLIPConfig()),
           "SiglipModel (siglip)": lambda: transformers.SiglipModel(transformers.SiglipConfig())}
    if hasattr(transformers, "Siglip2Model"):
        out["Siglip2Model (siglip2)"] = lambda: transformers.Siglip2Model(transformers.Siglip2Config())
    return out


def _wrap_hf(model: nn.Module) -> nn.Module:
    from sith.engine.towers.hf import HF_TYPES, HFModel

    if model.config.model_type not in HF_TYPES:
        raise InvalidInput("model", f"transformers {type(model).__name__} ({model.config.model_type}) is not "
                           f"supported (supported model types: {', '.join(sorted(HF_TYPES))})")
    return HFModel(model.eval())


def _describe(row: Row, holder: nn.Module) -> None:
    from sith.engine.towers import adapter_for, tower_kind

    row.tower = tower_kind(holder)
    try:
        tower = adapter_for(holder)
        row.family = tower.family
        row.shape = f"{tower.num_layers}×{tower.num_heads}×{tower.head_dim}, d={tower.width}, D={tower.output_dim}"
        row.status, row.why = "works", tower.joint_note
    except InvalidInput as exc:
        row.status, row.why = "not", exc.reason


def _mlp_effect(tower, vectors: torch.Tensor) -> float | None:
    """Mean cos(readout(v), readout(v) with the pool head's MLP branch removed)."""
    pool = getattr(getattr(tower.visual, "trunk", None), "attn_pool", None)
    if pool is None:
        pool = getattr(tower, "head", None)
    mlp = getattr(pool, "mlp", None)
    if mlp is None:
        return None
    readout, proj, _ = tower.joint_pieces()

    def run() -> torch.Tensor:
        z = readout(vectors)
        return z @ proj if proj is not None else z

    with torch.no_grad():
        full = run()
        handle = mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            linear = run()
        finally:
            handle.remove()
    return float(torch.nn.functional.cosine_similarity(full, linear, dim=-1).mean())


def _check(row: Row, holder: nn.Module) -> None:
    from sith.engine.decomposition import factor_svd
    from sith.engine.towers import adapter_for

    tower = adapter_for(holder)
    layer = tower.num_layers - 1
    with torch.no_grad():
        a, b = tower.vo_factors(layer)
        u, s, v = factor_svd(a, b)
        dense = torch.linalg.svdvals(a[:1].double() @ b[:1].double())[0, : s.shape[1]]
        row.checks["sigma_rel_err"] = float((dense - s[0].double()).abs().max() / dense[0])
        out = tower.access(layer).out
        before = out.weight.detach().clone(), (out.bias.detach().clone() if out.bias is not None else None)
        tower.write_head_output(layer, 0, b[0])
        row.checks["alpha1_max_change"] = float((out.weight - before[0]).abs().max())
        cut = torch.ones_like(s[0])
        cut[0] = 0
        coords = torch.linalg.pinv(a[0].double()) @ u[0].double()
        tower.write_head_output(layer, 0, coords @ torch.diag(cut.double() * s[0].double()) @ v[0].double().T)
        a2, b2 = tower.vo_factors(layer)
        s2 = torch.linalg.svdvals(a2[0].double() @ b2[0].double())[: s.shape[1]]
        row.checks["alpha0_top_sigma_left"] = float(s2[0] / s[0, 0])  # now the 2nd σ's share
        row.checks["alpha0_expected"] = float(s[0, 1] / s[0, 0])
        out.weight.copy_(before[0])
        if before[1] is not None:
            out.bias.copy_(before[1])
        effect = _mlp_effect(tower, v.transpose(1, 2).reshape(-1, v.shape[1]))
        if effect is not None:
            row.checks["map_mlp_cos"] = effect


def _text_note(name: str) -> str:
    import open_clip

    cfg = open_clip.get_model_config(name)
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name"):
        return f"HF {text['hf_model_name']} (needs transformers + its config in the Hub cache)"
    kind = "CoCa decoder" if "multimodal_cfg" in cfg else "custom" if cfg.get("custom_text") else "stock"
    if text.get("hf_tokenizer_name"):
        return f"{kind}; HF tokenizer {text['hf_tokenizer_name']} (built on first text use)"
    return kind


def _params(holder: nn.Module) -> int:
    return sum(p.numel() for p in holder.parameters())


def rows(check_params: float, only: str | None = None, log=print) -> list[Row]:
    import open_clip

    out = []
    names = [n for n in open_clip.list_models() if only is None or only in n]
    for name in names:
        row = Row("open_clip", name, text=_text_note(name))
        started = time.time()
        try:
            meta = _openclip_tower(name, "meta")
        except Exception as exc:  # a tower that cannot even be described on the meta device
            row.status, row.why = "not", f"cannot build: {type(exc).__name__}: {str(exc)[:120]}"
            out.append(row)
            continue
        _describe(row, meta)
        if row.status == "works" and _params(meta) <= check_params:
            try:
                torch.manual_seed(0)
                _check(row, _openclip_tower(name, "cpu").eval())
            except Exception as exc:
                row.checks["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        log(f"{name}: {row.status} {row.family} {row.checks} ({time.time() - started:.1f}s)")
        out.append(row)
    for name, make in _hf_models().items():
        if only is not None and only not in name:
            continue
        row = Row("transformers", name)
        try:
            torch.manual_seed(0)
            with torch.device("meta"):
                model = make()
            row.tower = type(model).__name__
            _describe(row, _wrap_hf(model))
            if row.status == "works":
                torch.manual_seed(0)
                _check(row, _wrap_hf(make()))
        except InvalidInput as exc:
            row.status, row.why = "not", exc.reason
        except Exception as exc:
            row.checks["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        log(f"{name}: {row.status} {row.family} {row.checks}")
        out.append(row)
    return out


def _fmt(checks: dict) -> str:
    parts = []
    if "sigma_rel_err" in checks:
        parts.append(f"σ err {checks['sigma_rel_err']:.0e}")
    if "alpha1_max_change" in checks:
        parts.append(f"α=1 Δw {checks['alpha1_max_change']:.0e}")
    if "alpha0_top_sigma_left" in checks:
        ok = abs(checks["alpha0_top_sigma_left"] - checks["alpha0_expected"]) < 1e-4
        parts.append("α=0 exact" if ok else f"α=0 off ({checks['alpha0_top_sigma_left']:.4f})")
    if "map_mlp_cos" in checks:
        parts.append(f"MAP-MLP cos {checks['map_mlp_cos']:.3f}")
    if "error" in checks:
        parts.append(f"check failed: {checks['error']}")
    return "; ".join(parts) or "(not built: over the size limit)"


def markdown(table: list[Row]) -> str:
    works = sum(r.status == "works" for r in table)
    lines = [f"{works} of {len(table)} architectures have a tower adapter "
             f"(open_clip {open_clip_version()}, transformers {transformers_version()}).", "",
             "| source | architecture | vision tower | family | blocks×heads×dh, width, joint dim | status | why / joint map | checks (random init) | text tower |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        why = r.why.replace("|", "/")
        lines.append(f"| {r.source} | {r.name} | {r.tower} | {r.family} | {r.shape} | {r.status} | {why} | "
                     f"{_fmt(r.checks) if r.status == 'works' else ''} | {r.text or 'transformers'} |")
    return "\n".join(lines) + "\n"


def open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


def transformers_version() -> str:
    try:
        import transformers
    except ModuleNotFoundError:
        return "not installed"
    return transformers.__version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    parser.add_argument("--check-params", type=float, default=120e6,
                        help="build and check towers with at most this many vision parameters")
    parser.add_argument("--only", default=None, help="only architectures whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = rows(args.check_params, args.only, log=lambda s: print(s, flush=True))
    text = markdown(table)
    if args.out:
        write(args.out, text)
    else:
        print(text)


START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def write(path: str, table: str) -> None:
    """Write the table to ``path``; a file with the START/END markers keeps everything around them."""
    from pathlib import Path

    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.is_file() else ""
    if START in old and END in old:
        head, rest = old.split(START, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{START}\n{table}{END}{tail}"
    else:
        text = table
    target.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
