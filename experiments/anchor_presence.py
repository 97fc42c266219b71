"""Which presence of an anchored removal predicts its measured recall (validation only, no new images).

An anchored map takes a share of the concept's write off and re-writes κ of it along the anchor
(docs/edits.md, "Anchors"). Three ways to score what the edited concept keeps:

* ``written``   — presence on the maps as written (the anchor's re-write along ĝ counts as the
  concept's; the planner's rule until 2026-11-30);
* ``unanchored`` — presence on the maps with v in place of v − κâ (the re-write does not count; the
  planner's rule since);
* ``beyond``    — presence along the part of ĝ orthogonal to the anchor's direction (what tells
  the concept from its anchor).

For every point of ``head_mlp_orthogonal`` in experiments/frontier.json (both models, every removal,
κ and target) the plan is rebuilt (data-free) and each score, prior-corrected as the planner aims
(+ PRIOR_WEIGHT · prior), is set against the point's *validation* recall: Spearman rank correlation,
and the accuracy of the best single threshold at telling the points whose recall met the removal
target (the frontier's Wilson rule) from the rest. Writes experiments/anchor_presence.json.

    nice .venv/bin/python experiments/anchor_presence.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import frontier  # noqa: E402
from sith.edits import plan as plan_module  # noqa: E402
from sith.edits.operators import Geometry, kept_share, predicted_presence, tower_writers  # noqa: E402
from sith.engine.analysis import Analyzer  # noqa: E402
from sith.engine.dictionary import build_dictionary  # noqa: E402
from sith.engine.models import TESTBED_DIR, load_model  # noqa: E402
from sith.testbed.vocabulary import testbed_vocabulary  # noqa: E402

SCORES = ("written", "unanchored", "beyond")
OPERATOR = "head_mlp_orthogonal"


def scores(geometry: Geometry, plan, concept: str, anchor: str | None, kappa: float) -> dict[str, float]:
    written = predicted_presence(geometry, plan.multipliers, [concept])[concept]
    if anchor is None or kappa <= 0:
        return dict.fromkeys(SCORES, written)
    a = geometry.residual_direction(anchor)
    a = a / a.norm()
    g = geometry.residual_direction(concept)
    return {"written": written,
            # the preview's own presence of the edited concept (plan._Planner.unanchored_pairs)
            "unanchored": next(e.after for e in plan.predicted if e.concept == concept),
            "beyond": kept_share(geometry, plan.multipliers, F.normalize(g - (g @ a) * a, dim=0))}


def model_rows(name: str, stored: dict) -> list[dict]:
    loaded = load_model(config=str(TESTBED_DIR.parent / name))
    analyzer = Analyzer(loaded, build_dictionary(loaded, testbed_vocabulary()))
    geometry = Geometry(analyzer.joint, analyzer.dictionary, analyzer.decomposition(list(range(loaded.info.layers))),
                        *tower_writers(loaded))
    rows = []
    for task_name, entry in stored["tasks"].items():
        task = entry["task"]
        if task["kind"] != "remove":
            continue
        (concept,) = task["concepts"]
        spec = frontier.spec_for(loaded, task, OPERATOR, 0.15)
        preserved = plan_module.preserved_concepts(spec, 0, analyzer.dictionary)
        anchor = plan_module.anchor_for(spec, 0, concept, preserved, analyzer.dictionary)
        prior = plan_module.PRIOR_WEIGHT * geometry.prior_score(concept, preserved)
        for p in entry["points"]:
            if p["operator"] != OPERATOR:
                continue
            kappa = p.get("anchor") or 0.0
            plan = plan_module.plan_edit(analyzer, frontier.spec_for(loaded, task, OPERATOR, p["target"]),
                                         anchor_weight=kappa)
            effective = {k: v + prior for k, v in scores(geometry, plan, concept, anchor, kappa).items()}
            rows.append({"model": name, "task": task_name, "anchor": anchor, "kappa": kappa, "target": p["target"],
                         **effective, "recall": p["val"]["recall"],
                         "met": frontier.effect_met(p["val"], task, confident=True)})
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    recall = [r["recall"] for r in rows]
    met = [r["met"] for r in rows]
    for key in SCORES:
        x = [r[key] for r in rows]
        best = max(sum((xi <= t) == m for xi, m in zip(x, met)) for t in x) / len(rows)
        out[key] = {"spearman": frontier.spearman(x, recall), "threshold_accuracy": best}
    return out


def main() -> int:
    stored = json.loads((HERE / "frontier.json").read_text(encoding="utf-8"))
    torch.set_num_threads(1)
    rows = [row for name in sorted(stored) for row in model_rows(name, stored[name])]
    result = {"points": len(rows), "all": summary(rows),
              "anchored": summary([r for r in rows if r["kappa"] > 0]), "rows": rows}
    (HERE / "anchor_presence.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"{len(rows)} validation points of {OPERATOR} (removals; both models)")
    print("| score | Spearman vs recall (all / anchored) | best one-threshold accuracy (all / anchored) |")
    print("|---|---|---|")
    for key in SCORES:
        a, b = result["all"][key], result["anchored"][key]
        print(f"| {key} | {a['spearman']:.2f} / {b['spearman']:.2f} | {a['threshold_accuracy']:.2f} / "
              f"{b['threshold_accuracy']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
