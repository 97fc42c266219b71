"""Library results -> sith.v1 messages: the one place a worker's result gets its API schema.

Each handler builds its result here once; the worker stores it as a google.protobuf.Any (in the
Any's canonical JSON form, so the Redis record stays readable) and the server hands that Any to
clients unchanged. Field names follow the proto; nothing downstream guesses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sith_api.v1 import adaptation_pb2 as apb
from sith_api.v1 import sith_pb2 as pb
from sith_workers import specs


def model(loaded) -> pb.ModelSummary:
    return pb.ModelSummary(name=loaded.name, hash=loaded.hash)


def concepts(pairs: Iterable[Sequence[Any]] | None) -> list[pb.Concept]:
    """(name, score) pairs as Concept messages."""
    return [pb.Concept(name=str(name), score=float(score)) for name, score in (pairs or ())]


def tensor(array) -> pb.Tensor:
    a = np.ascontiguousarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array, dtype="<f4")
    return pb.Tensor(shape=list(a.shape), dtype=pb.Tensor.FLOAT32, data=a.tobytes())


def _optional(message, field: str, value: float | None) -> None:
    if value is not None and math.isfinite(float(value)):
        setattr(message, field, float(value))


# ---- analysis ---------------------------------------------------------------------------------

def vector_explanation(v) -> pb.VectorExplanation:
    out = pb.VectorExplanation(layer=v.layer, head=v.head, index=v.index, sigma=float(v.sigma),
                               concepts=concepts(v.concepts))
    _optional(out, "fidelity", v.fidelity)
    _optional(out, "confidence", getattr(v, "confidence", None))
    return out


def explain(loaded, heads) -> pb.ExplainHeadsResponse:
    return pb.ExplainHeadsResponse(model=model(loaded), heads=[
        pb.HeadExplanation(layer=h.layer, head=h.head, vectors=[vector_explanation(v) for v in h.vectors],
                           theme=concepts(h.theme)) for h in heads])


def find(loaded, hits) -> pb.FindConceptResponse:
    return pb.FindConceptResponse(model=model(loaded), hits=[
        pb.SearchHit(layer=h.layer, head=h.head, index=h.index, score=float(h.score), sigma=float(h.sigma),
                     concepts=concepts(h.concepts), matched=getattr(h, "matched", ""),
                     coefficient=float(getattr(h, "coefficient", 0.0)), cosine=float(getattr(h, "cosine", 0.0)))
        for h in hits])


def decompose(loaded, convention: str, svds: Mapping[int, Any]) -> pb.DecomposeResponse:
    return pb.DecomposeResponse(model=model(loaded), convention=convention, layers=[
        pb.LayerSpectrum(layer=layer, heads=int(svd.S.shape[0]), rank=int(svd.S.shape[1]), singular_values=tensor(svd.S))
        for layer, svd in svds.items()])


# ---- edits ------------------------------------------------------------------------------------

def edit_plan(plan, spec: pb.EditSpec) -> pb.EditPlan:
    """``sith.edits.plan.EditPlan`` as the API's EditPlan; ``spec`` is the stored proto spec, ``planned``
    the library's, defaults filled in."""
    out = pb.EditPlan(spec=spec, planned=specs.from_library(plan.spec),
                      model=pb.ModelSummary(name=plan.model_name, hash=plan.model_hash),
                      judge=str(plan.judge), notes=[str(n) for n in plan.notes],
                      warnings=[str(w) for w in getattr(plan, "warnings", ())])
    for a in plan.affected:
        out.affected.add(layer=a.layer, head=a.head, index=a.index, sigma=float(a.sigma), alpha=float(a.alpha),
                         relevance=float(a.relevance), operation=a.operation, concepts=concepts(a.concepts),
                         operator=str(getattr(a, "operator", "") or ""))
    for h in plan.heads:
        out.heads.add(layer=h.layer, head=h.head, vectors=h.vectors, energy_before=float(h.energy_before),
                      energy_after=float(h.energy_after), energy_ratio=float(h.energy_ratio))
    for c in plan.concept_alignment:
        out.concept_alignment.add(concept=c.concept, operation=c.operation, layer=c.layer, head=c.head,
                                  before=float(c.before), after=float(c.after))
    for e in getattr(plan, "predicted", ()):
        out.predicted.add(concept=e.concept, role=e.role, before=float(e.before), after=float(e.after))
    return out


# ---- adaptation (the library's report documents) ----------------------------------------------

def _f(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _pairs(items: Any) -> list[pb.Concept]:
    out = []
    for item in items or ():
        if isinstance(item, Mapping):
            out.append(pb.Concept(name=str(item["concept"]), score=_f(item["score"])))
        else:
            out.append(pb.Concept(name=str(item[0]), score=_f(item[1])))
    return out


def delta_report(d: Mapping[str, Any]) -> apb.DeltaReport:
    """``sith.adaptation.reports.delta_report`` (a JSON document) as a DeltaReport."""
    out = apb.DeltaReport(base=pb.ModelSummary(**d["base"]), finetuned=pb.ModelSummary(**d["finetuned"]),
                          convention=d["convention"], joint_space=d["joint_space"], method=d["method"],
                          k=int(d["k"]), coherence=_f(d["coherence"]))
    for h in d["top_heads"]:
        top = out.top_heads.add(layer=h["layer"], head=h["head"], norm=_f(h["norm"]), relative=_f(h["relative"]),
                                effective_rank=_f(h["effective_rank"]))
        for direction in h.get("directions", ()):
            top.directions.add(index=direction["index"], sigma=_f(direction["sigma"]),
                               positive=_pairs(direction["positive"]), negative=_pairs(direction["negative"]))
    for h in d["heads"]:
        out.heads.add(layer=h["layer"], head=h["head"], **{k: _f(h[k]) for k in (
            "relative", "norm", "effective_rank", "right_subspace_cos", "left_subspace_cos",
            "weighted_matched_cos", "diagonal_dominance", "captured")},
            sigma_ratio=[_f(x) for x in h.get("sigma_ratio", ())])
    for row in d["layers"]:
        out.layers.add(layer=row["layer"], top_head=int(row["top_head"]), **{
            k: _f(row[k]) for k in ("mean_relative", "max_relative", "delta_norm", "right_subspace_cos",
                                    "left_subspace_cos", "matched_cos", "weighted_matched_cos",
                                    "sigma_ratio_median", "diagonal_dominance", "captured") if k in row})
    return out


def _match(m: Mapping[str, Any]) -> apb.HeadMatch:
    return apb.HeadMatch(a=apb.HeadRef(layer=m["a"][0], head=m["a"][1]), b=apb.HeadRef(layer=m["b"][0], head=m["b"][1]),
                         score=_f(m["score"]), mutual=bool(m["mutual"]), category_a=m.get("category_a") or "",
                         category_b=m.get("category_b") or "", top_concepts=list(m.get("top_concepts") or ()),
                         truth_a=m.get("truth_a") or "", truth_b=m.get("truth_b") or "")


def _null(d: Mapping[str, Any], kind: str) -> apb.NullDistribution:
    """One permutation null of the report (``null`` / ``label_shuffle_null``); z stays unset when undefined."""
    out = apb.NullDistribution(kind=str(d.get("kind", kind)), description=str(d.get("description", "")),
                               permutations=int(d.get("permutations") or 0), mean=_f(d.get("mean")),
                               std=_f(d.get("std")), p_value=_f(d.get("p_value")))
    _optional(out, "z", d.get("z"))
    return out


def _agreement(d: Mapping[str, Any]) -> apb.LabelAgreement:
    return apb.LabelAgreement(observed=_f(d.get("observed")), chance_mean=_f(d.get("chance_mean")),
                              chance_std=_f(d.get("chance_std")), p_value=_f(d.get("p_value")),
                              pairs=int(d.get("pairs") or 0), agreeing=int(d.get("agreeing") or 0))


def match_report(d: Mapping[str, Any]) -> apb.MatchReport:
    """``sith.adaptation.reports.match_report``'s document as a MatchReport."""
    out = apb.MatchReport(a=apb.MatchedModel(**d["a"]), b=apb.MatchedModel(**d["b"]),
                          vocabulary_size=int(d["vocabulary_size"]), method=d["method"], k=int(d["k"]),
                          coherence=_f(d["coherence"]), mean_score=_f(d["mean_score"]),
                          null_mean_score=_f(d["null_mean_score"]), null_std=_f(d["null_std"]),
                          mutual=int(d["mutual"]), matches=[_match(m) for m in d["matches"]])
    if d.get("specialised"):
        s = d["specialised"]
        out.specialised.a.update({k: int(v) for k, v in s.get("a", {}).items()})
        out.specialised.b.update({k: int(v) for k, v in s.get("b", {}).items()})
        out.specialised.shared_matches.extend(_match(m) for m in s.get("shared_matches", ()))
    if d.get("null") is not None:
        out.usage_null.CopyFrom(_null(d["null"], "usage"))
    if d.get("label_shuffle_null") is not None:
        out.label_shuffle_null.CopyFrom(_null(d["label_shuffle_null"], "labels"))
    if d.get("category_null") is not None:
        out.category_null.CopyFrom(_null(d["category_null"], "categories"))
    out.profile = str(d.get("profile", ""))
    out.all_pairs_mean = _f(d.get("all_pairs_mean"))
    if d.get("similarity") is not None:
        sim = d["similarity"]
        out.similarity.heads_a.extend(apb.HeadRef(layer=h[0], head=h[1]) for h in sim["heads_a"])
        out.similarity.heads_b.extend(apb.HeadRef(layer=h[0], head=h[1]) for h in sim["heads_b"])
        out.similarity.rows.extend(apb.SimilarityRow(values=[_f(x) for x in row]) for row in sim["matrix"])
    for key, value in (d.get("agreement") or {}).items():
        if key not in apb.MatchAgreement.DESCRIPTOR.fields_by_name:
            raise ValueError(f"match report agreement {key!r} has no field in sith.v1.MatchAgreement")
        getattr(out.agreement, key).CopyFrom(_agreement(value))
    return out
