"""Validation sweep of λ_o (``preserve_others_weight``, sith.edits.plan): the second, weaker
preservation term for every other dictionary concept in the default operator's closed form.

    nice .venv/bin/python experiments/preserve_others_sweep.py --model sith/testbed/checkpoints/testbed-main
    .venv/bin/python experiments/preserve_others_sweep.py --summary     # the table of the stored JSON

The stored sweep (docs/edits.md, "Frontier") ran, per model, side by side:
``--grid 0 2 8 32 128 --lam 1 2 4 8 --rule library world no_group``, ``--grid 0.5 4 --lam 2``,
``--grid 0 4 8 --lam 2 --target 0.25 0.3`` and ``--grid 0 8 --lam 2 --last 3 4 5`` (main) /
``--grid 0 8 32 --lam 2 4 --last 2 3 4`` (small).

Only the default command of the time (head_mlp_project, pinned as ``ONE_SIDED``; target 0.2, λ = 2,
prior weight 1.2) is planned, with λ_o over a small grid (optionally also over λ (``--lam``), the suppress target
(``--target``), the "other" set (``--rule``) and the edit restricted to the last k layers (``--last``)),
applied and measured on the frontier's VALIDATION split only (experiments/frontier.py: world seeds
HELDOUT+20/+30, 400 natural / 200 spurious images); the test seeds are never generated here. Each
configuration is scored with the frontier's own validation rule (``frontier.choice_key``). Writes
experiments/preserve_others_sweep.json (merged per model) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontier import TASKS, Splits, choice_key, spec_for, summarise  # noqa: E402
from tasks import natural_set, spurious_set  # noqa: E402

from sith.edits.apply import apply_multipliers  # noqa: E402
from sith.edits import plan as plan_module  # noqa: E402
from sith.edits.plan import plan_edit, preserved_concepts  # noqa: E402
from sith.edits.spec import EditSpec  # noqa: E402
from sith.engine.analysis import Analyzer  # noqa: E402
from sith.engine.dictionary import build_dictionary  # noqa: E402
from sith.engine.models import load_model  # noqa: E402
from sith.testbed.vocabulary import testbed_vocabulary  # noqa: E402

HERE = Path(__file__).resolve().parent
# The form this sweep (and retention_diagnostics/retention_variants) studies: head_mlp_project, the
# default operator when they were run; pinned so that they regenerate the same tables now that the
# default is head_mlp_orthogonal (docs/edits.md), with their target.
ONE_SIDED = "head_mlp_project"
ONE_SIDED_TARGET = 0.2  # the default suppress target of the time ("default" in the tables)


class ValidationSplits(Splits):
    """The frontier's validation split only (the fresh test seeds are not even generated)."""

    def __init__(self, loaded, n_val: int, n_val_spu: int) -> None:
        self._setup(loaded, {"val": (natural_set(n_val, "val"), spurious_set(n_val_spu, "val"))})


def validation_setup(folder: str, n_val: int, n_spu: int) -> tuple:
    """(loaded model, its Analyzer over the testbed vocabulary, its validation splits), seeded like
    the frontier: what every validation-only script here starts from."""
    torch.manual_seed(0)
    loaded = load_model(config=folder)
    analyzer = Analyzer(loaded, build_dictionary(loaded, testbed_vocabulary()))
    return loaded, analyzer, ValidationSplits(loaded, n_val, n_spu)


DEFAULT_MODELS = ("sith/testbed/checkpoints/testbed-main", "sith/testbed/checkpoints/testbed-small")


def validation_parser(doc: str | None, out_name: str, summary: bool = True) -> argparse.ArgumentParser:
    """The options every validation-only study shares: models, validation sizes, the JSON it writes
    (and ``--summary``, where the study prints a table of it)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="hf-hub style folder (repeatable)")
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--n-val-spurious", type=int, default=200)
    parser.add_argument("--out", default=str(HERE / out_name))
    if summary:
        parser.add_argument("--summary", action="store_true", help="print the table of the stored JSON and exit")
    return parser


def with_layers(spec: EditSpec, layers: list[int] | None) -> EditSpec:
    if layers is None:
        return spec
    d = spec.to_dict()
    for op in d["operations"]:
        op["layers"] = layers
    return EditSpec.from_dict(d)


LIBRARY_RULE = plan_module.other_concepts


def world_rule(spec, i, dictionary, preserved):
    """Variant: the library rule restricted to world-factor values (no shape-group words, no
    distractors such as "photo")."""
    from sith.testbed.vocabulary import testbed_categories

    world = {w for f, words in testbed_categories().items() if f != "group" for w in words}
    return [c for c in LIBRARY_RULE(spec, i, dictionary, preserved) if c in world]


def no_group_rule(spec, i, dictionary, preserved):
    """Variant: the library rule without the shape-group words (round, angular)."""
    from sith.testbed.vocabulary import testbed_categories

    group = set(testbed_categories()["group"])
    return [c for c in LIBRARY_RULE(spec, i, dictionary, preserved) if c not in group]


RULES = {"library": LIBRARY_RULE, "world": world_rule, "no_group": no_group_rule}


def run(folder: str, grid: list[float], last: list[int | None], tasks: list[str], n_val: int, n_spu: int,
        lams: list[float], rules: list[str], targets: list[float | None] = (None,)) -> dict:
    started = time.time()
    loaded, analyzer, splits = validation_setup(folder, n_val, n_spu)
    base_model = loaded.model.eval()
    n_layers = loaded.info.layers
    out: dict = {"model": loaded.name, "hash": loaded.hash, "sizes": [n_val, n_spu], "grid": grid, "lambdas": lams,
                 "rules": rules, "rows": []}
    bases = {name: splits.measure(base_model, "val", TASKS[name]) for name in tasks}
    configs = [(rule, k, lam, lam_o, target) for target in targets for rule in rules for k in last for lam in lams
               for lam_o in grid if not (lam_o == 0 and rule != rules[0])]
    try:
        for rule, k, lam, lam_o, target in configs:
            plan_module.other_concepts = RULES[rule]  # the planner looks the rule up at plan time
            layers = None if k is None else list(range(n_layers - k, n_layers))
            row: dict = {"rule": rule, "lambda": lam, "lambda_o": lam_o, "last_layers": k, "target": target,
                         "tasks": {}}
            for name in tasks:
                task = TASKS[name]
                spec = with_layers(spec_for(loaded, task, ONE_SIDED, ONE_SIDED_TARGET if target is None else target),
                                   layers)
                plan = plan_edit(analyzer, spec, preserve_weight=lam, preserve_others_weight=lam_o)
                model = apply_multipliers(loaded.model, plan.multipliers, plan.decomposition).eval()
                s = summarise(splits.measure(model, "val", task), bases[name], task)
                feasible, key = choice_key(s, task)
                others = plan_module.other_concepts(plan.spec, 0, analyzer.dictionary,
                                                    preserved_concepts(plan.spec, 0, analyzer.dictionary))
                row["tasks"][name] = {**s, "feasible": feasible, "key": key, "others": len(others),
                                      "warnings": [w[:80] for w in plan.warnings if not w.startswith("[preserve]")]}
                print(f"[{time.time() - started:.0f}s] {loaded.name} {rule} t={target} last={k} λ={lam:g} "
                      f"λo={lam_o:g} {name}: "
                      f"{json.dumps({a: (round(b, 4) if isinstance(b, float) else b) for a, b in s.items()})} "
                      f"key=({feasible}, {key:.4f})", flush=True)
            out["rows"].append(row)
    finally:
        plan_module.other_concepts = LIBRARY_RULE
    out["seconds"] = round(time.time() - started)
    return out


def summary(raw: dict) -> list[dict]:
    """Per configuration (rule, last layers, λ, λ_o): the validation key of every (model, task),
    its mean and worst when every task is feasible (the frontier's rule), sorted best first."""
    cells: dict[tuple, dict] = {}
    for model, runs in raw.items():
        for result in runs:
            for row in result["rows"]:
                cfg = (row.get("rule", "library"), row["last_layers"], row.get("lambda"), row["lambda_o"],
                       row.get("target"))
                for name, t in row["tasks"].items():
                    cells.setdefault(cfg, {})[(model, name)] = t
    out = []
    for cfg, tasks in cells.items():
        feasible = all(t["feasible"] for t in tasks.values())
        keys = [t["key"] for t in tasks.values()]
        out.append({"rule": cfg[0], "last_layers": cfg[1], "lambda": cfg[2], "lambda_o": cfg[3], "target": cfg[4],
                    "tasks": tasks,
                    "feasible": feasible, "mean": sum(keys) / len(keys) if feasible else None,
                    "worst": min(keys) if feasible else None})
    return sorted(out, key=lambda r: (r["feasible"], r["mean"] or 0.0), reverse=True)


def render(rows: list[dict]) -> str:
    names = sorted({k for r in rows for k in r["tasks"]}, key=lambda k: (k[0] != "testbed-main", k))
    head = "| rule | layers | target | λ | λ_o | " + " | ".join(f"{m.replace('testbed-', '')} {t}" for m, t in names) + \
        " | mean | worst |"
    lines = [head, "|" + "---|" * (7 + len(names))]
    for r in rows:
        cols = []
        for k in names:
            t = r["tasks"].get(k)
            if t is None:
                cols.append("–")
            elif t["feasible"]:
                cols.append(f"{t['key']:.3f}")
            elif "recall" in t:
                cols.append(f"recall {100 * t['recall']:.1f} %")
            else:
                cols.append(f"gain {100 * t['worst_gain']:+.0f}")
        tail = f"{r['mean']:.3f} | {r['worst']:.3f}" if r["feasible"] else "misses | –"
        layers = "all" if r["last_layers"] is None else f"last {r['last_layers']}"
        target = "default" if r["target"] is None else f"{r['target']:g}"
        lines.append(f"| {r['rule']} | {layers} | {target} | {r['lambda']:g} | {r['lambda_o']:g} | " + " | ".join(cols) +
                     f" | {tail} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = validation_parser(__doc__, "preserve_others_sweep.json")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0, 0.5, 2.0, 8.0])
    parser.add_argument("--last", type=int, nargs="*", default=None,
                        help="also restrict the edit to the last k layers (0 = every layer)")
    parser.add_argument("--lam", type=float, nargs="+", default=[plan_module.DEFAULT_PRESERVE_WEIGHT],
                        help="λ (preserve_weight) values")
    parser.add_argument("--rule", nargs="+", choices=list(RULES), default=["library"],
                        help="which concepts the λ_o term protects (library rule or a variant)")
    parser.add_argument("--target", type=float, nargs="+", default=None,
                        help=f"suppress targets (default: ONE_SIDED_TARGET, {ONE_SIDED_TARGET:g})")
    parser.add_argument("--task", action="append", choices=list(TASKS))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary:
        print(render(summary(json.loads(Path(args.out).read_text(encoding="utf-8")))))
        return 0
    torch.set_num_threads(1)
    last = [None] if not args.last else [None if k == 0 else k for k in args.last]
    path = Path(args.out)
    for folder in args.model:
        result = run(folder, args.grid, last, args.task or list(TASKS), args.n_val, args.n_val_spurious,
                     args.lam, args.rule, args.target or [None])
        raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        raw.setdefault(result["model"], []).append(result)
        path.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
