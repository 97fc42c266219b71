"""Job kinds ``adapt_delta`` and ``universality`` (registered in handlers.py, imported on first use).

Payloads (all keys optional unless marked):
  adapt_delta   {base (required), finetuned (required), layers, directions=3, top=8, k=5,
                 coherence=0.3, dictionary | vocabulary="testbed", image_mean}
  universality  {model_a (required), model_b (required), layers_a, layers_b, k=5, coherence=0.3,
                 dictionary | vocabulary="testbed", categories ("testbed" or {category: [concepts]}),
                 permutations=20, profile="relative-capacity" | "capacity" | "comp"}
Models are references as for the other kinds. Both models of a universality job are coded over the
same concept list (each with its own text tower), which is what makes their profiles comparable.
Results are the documents of ``sith.adaptation.reports`` (what ``sith adapt ... --json`` prints) as
sith.v1 DeltaReport / MatchReport messages (``sith_workers.results``).
"""

from __future__ import annotations

from typing import Any

from sith.engine.errors import InvalidInput


def _concepts(payload: dict) -> list[str] | None:
    """The payload's concept list: explicit ``dictionary``, or ``vocabulary`` "testbed"/"default"."""
    from sith.testbed.vocabulary import testbed_vocabulary

    if payload.get("dictionary") is not None:
        return payload["dictionary"]  # validated by ctx.analyzer
    vocabulary = payload.get("vocabulary", "default")
    if vocabulary == "testbed":
        return testbed_vocabulary()
    if vocabulary == "default":
        return None
    raise InvalidInput("vocabulary", f"expected 'testbed' or 'default', got {vocabulary!r}")


def _categories(payload: dict) -> dict[str, list[str]] | None:
    from sith.testbed.vocabulary import testbed_categories

    value = payload.get("categories")
    if value in (None, "", "none"):
        return None
    if value == "testbed":
        return testbed_categories()
    if isinstance(value, dict) and all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                       for v in value.values()):
        return value
    raise InvalidInput("categories", "expected 'testbed' or an object {category: [concepts]}")


def _required(payload: dict, key: str) -> Any:
    if not payload.get(key):
        raise InvalidInput(key, "required")
    return payload[key]


def _int(payload: dict, key: str, default: int, low: int, high: int) -> int:
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(key, f"expected an integer in [{low}, {high}], got {value!r}")
    return value


def adapt_delta(ctx, payload: dict):
    from sith.adaptation.reports import delta_report
    from sith_workers.results import delta_report as typed

    base_ref, ft_ref = _required(payload, "base"), _required(payload, "finetuned")
    ctx.step(0.0, "loading models and dictionary")
    base = ctx.models.get(base_ref)
    options = {"dictionary": _concepts(payload), "image_mean": payload.get("image_mean")}
    analyzer = ctx.analyzer({"model": ft_ref, **options})
    return typed(delta_report(base, analyzer.loaded, analyzer, payload.get("layers"),
                        directions=_int(payload, "directions", 3, 0, 64), top=_int(payload, "top", 8, 1, 1000),
                        k=_int(payload, "k", 5, 1, 50), coherence=payload.get("coherence", 0.3), step=ctx.step))


def universality(ctx, payload: dict):
    from sith.adaptation.reports import match_report
    from sith.adaptation.universality import DEFAULT_PROFILE
    from sith_workers.results import match_report as typed

    ref_a, ref_b = _required(payload, "model_a"), _required(payload, "model_b")
    ctx.step(0.0, "loading models and dictionaries")
    options = {"dictionary": _concepts(payload), "image_mean": payload.get("image_mean")}
    analyzer_a = ctx.analyzer({"model": ref_a, **options})
    analyzer_b = ctx.analyzer({"model": ref_b, **options})
    result, _ = match_report(analyzer_a, analyzer_b, payload.get("layers_a"), payload.get("layers_b"),
                             _categories(payload), k=_int(payload, "k", 5, 1, 50),
                             coherence=payload.get("coherence", 0.3),
                             permutations=_int(payload, "permutations", 20, 1, 1000), step=ctx.step,
                             profile=payload.get("profile", DEFAULT_PROFILE))
    return typed(result)
