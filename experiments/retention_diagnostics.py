"""Why the default removal misses "every other factor ≥ 97 %" (issue 11): three diagnostics on the
frontier's VALIDATION split only (the test seeds are never generated here).

1. **Concentration.** The default spreads one α over every writer (heads and MLPs of every layer).
   The planner's other mode, a fixed α with writers added greedily by their share of the concept's
   write capacity until the predicted presence reaches the target, puts the same removal on fewer
   writers. Measured for α ∈ {0, 0.3, 0.5}.
2. **A sensitivity floor.** The default command on every vocabulary word that names no world
   factor ("photo", "picture", "wall", "something", "object", ...: 12 words): what an edit of that
   size costs the factors when it removes nothing they use.
3. **Where the loss lands.** For the default removal of each concept: the other factors'
   accuracy on the concept's own images and on the rest, with the images lost and gained.
4. **Other closed forms.** The default T = I − (1 − α) ĝ vᵀ reads a write's component along ĝ and
   subtracts it along v = M⁻¹ĝ / ĝᵀM⁻¹ĝ, which avoids the preserved directions. "transposed"
   swaps the two (read v, write ĝ: UCE's own "preserved inputs map to themselves"): writes along the
   preserved directions are untouched and the concept's own write is scaled by α. "two-sided"
   reads and writes along v̂ = v / ‖v‖ (T = I − (1 − α) v̂ v̂ᵀ): preserved writes untouched and
   nothing written towards them, but the concept's write along ĝ is only scaled by
   1 − (1 − α)/‖v‖², so the planner's α under-removes. Measured for λ ∈ {1, 2, 4} and targets
   {0.2, 0.1, 0.0}.

    nice .venv/bin/python experiments/retention_diagnostics.py --model sith/testbed/checkpoints/testbed-main

Writes experiments/retention_diagnostics.json (merged per model) and prints what it measures.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontier import FACTOR_NAMES, TASKS, choice_key, store, summarise  # noqa: E402
from preserve_others_sweep import (DEFAULT_MODELS, ONE_SIDED, ONE_SIDED_TARGET,  # noqa: E402
                                   validation_parser, validation_setup)
from tasks import FACTORS  # noqa: E402

from sith.edits import plan as plan_module  # noqa: E402
from sith.edits.apply import apply_multipliers  # noqa: E402
from sith.edits.operators import preserving_pair  # noqa: E402
from sith.edits.plan import plan_edit  # noqa: E402
from sith.edits.spec import EditSpec  # noqa: E402
from sith.testbed.vocabulary import testbed_categories, testbed_vocabulary  # noqa: E402

HERE = Path(__file__).resolve().parent
GREEDY_ALPHAS = (0.0, 0.3, 0.5)
# (ĝ, v) -> the (read, write) pair of T = I − (1 − α) read writeᵀ (module docstring, item 4).
CLOSED_FORMS = {"transposed": lambda u, v: (v, u), "two-sided": lambda u, v: (v / v.norm(), v / v.norm())}


def non_factor_words() -> list[str]:
    """The testbed vocabulary's words that are no value of any world factor (nor a shape group)."""
    values = {w for words in testbed_categories().values() for w in words}
    return [w for w in testbed_vocabulary() if w not in values]


def _edited(loaded, analyzer, concepts: list[str], preserve_weight: float = plan_module.DEFAULT_PRESERVE_WEIGHT,
            **op) -> tuple[torch.nn.Module, int]:
    """The model after suppressing ``concepts`` (``ONE_SIDED_TARGET``; ``op`` overrides fields), and its writer count."""
    spec = EditSpec.from_dict({"model": loaded.name,
                               "operations": [{"concepts": concepts, "action": "suppress", "target": ONE_SIDED_TARGET,
                                               "operator": ONE_SIDED, **op}]})
    plan = plan_edit(analyzer, spec, preserve_weight=preserve_weight)
    return apply_multipliers(loaded.model, plan.multipliers, plan.decomposition).eval(), len(plan.affected)


def run(folder: str, n_val: int, n_spu: int) -> dict:
    started = time.time()
    loaded, analyzer, splits = validation_setup(folder, n_val, n_spu)
    base_model = loaded.model.eval()
    bases = {name: splits.measure(base_model, "val", task) for name, task in TASKS.items()}
    out: dict = {"model": loaded.name, "hash": loaded.hash, "sizes": [n_val, n_spu],
                 "base_factors": bases["red"]["factors"], "concentration": [], "floor": [], "where": []}

    for alpha in (None, *GREEDY_ALPHAS):  # None = the default: every writer, α solved
        row: dict = {"strength": alpha, "tasks": {}}
        for name, task in TASKS.items():
            extra = {} if alpha is None else {"strength": alpha}
            model, writers = _edited(loaded, analyzer, list(task["concepts"]), **extra)
            s = summarise(splits.measure(model, "val", task), bases[name], task)
            feasible, key = choice_key(s, task)
            row["tasks"][name] = {**s, "writers": writers, "feasible": feasible, "key": key}
            print(f"[{time.time() - started:.0f}s] {loaded.name} concentration α={alpha} {name}: writers {writers} "
                  f"key=({feasible}, {key:.3f}) {s}", flush=True)
        out["concentration"].append(row)

    task = TASKS["red"]  # any remove task: only the factor accuracies are read
    base = bases["red"]["factors"]
    for word in non_factor_words():
        model, writers = _edited(loaded, analyzer, [word])
        factors = splits.measure(model, "val", task)["factors"]
        kept = {f: factors[f] / base[f] for f in FACTOR_NAMES if base[f] > 0}
        out["floor"].append({"word": word, "writers": writers, "kept": kept})
        print(f"[{time.time() - started:.0f}s] {loaded.name} floor {word}: "
              f"{ {f: round(v, 3) for f, v in kept.items()} }", flush=True)

    out["closed_forms"] = []
    try:
        for variant, form in CLOSED_FORMS.items():
            # the planner builds every (read, write) pair with preserving_pair: re-form what it returns
            plan_module.preserving_pair = lambda *args, _form=form, **kwargs: _form(*preserving_pair(*args, **kwargs))
            for lam in (1.0, 2.0, 4.0):
                for target in (0.2, 0.1, 0.0):
                    row = {"form": variant, "lambda": lam, "target": target, "tasks": {}}
                    for name, task in TASKS.items():
                        model, _ = _edited(loaded, analyzer, list(task["concepts"]), preserve_weight=lam,
                                           target=target)
                        s = summarise(splits.measure(model, "val", task), bases[name], task)
                        feasible, key = choice_key(s, task)
                        row["tasks"][name] = {**s, "feasible": feasible, "key": key}
                    out["closed_forms"].append(row)
                    print(f"[{time.time() - started:.0f}s] {loaded.name} {variant} λ={lam} t={target}: "
                          f"{ {n: round(v['key'], 3) if v['feasible'] else 'miss' for n, v in row['tasks'].items()} }",
                          flush=True)
    finally:
        plan_module.preserving_pair = preserving_pair

    natural = splits.sets["val"][0]
    before = splits.embed(base_model, "val", 0)
    for name, task in TASKS.items():
        if task["kind"] != "remove":
            continue
        concept, own = task["concepts"][0], task["factor"]
        model, _ = _edited(loaded, analyzer, [concept])
        after = splits.embed(model, "val", 0)
        is_concept = natural.labels[own] == FACTORS[own].index(concept)
        for factor in FACTOR_NAMES:
            if factor == own:
                continue
            truth = natural.labels[factor]
            ok_before = splits.zs.predict(before, factor) == truth
            ok_after = splits.zs.predict(after, factor) == truth
            for images, mask in (("concept", is_concept & (truth >= 0)), ("rest", ~is_concept & (truth >= 0))):
                entry = {"task": name, "factor": factor, "images": images, "n": int(mask.sum()),
                         "base": float(ok_before[mask].float().mean()), "edited": float(ok_after[mask].float().mean()),
                         "lost": int((ok_before & ~ok_after & mask).sum()), "gained": int((~ok_before & ok_after & mask).sum())}
                out["where"].append(entry)
        print(f"[{time.time() - started:.0f}s] {loaded.name} where: {name} done", flush=True)
    out["seconds"] = round(time.time() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = validation_parser(__doc__, "retention_diagnostics.json", summary=False)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(args.out)
    for folder in args.model or DEFAULT_MODELS:
        store(path, run(folder, args.n_val, args.n_val_spurious))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
