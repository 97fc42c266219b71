"""The in-process API, for notebooks and scripts: the CLI's verbs as methods on a model.

    import sith
    model = sith.load("testbed-main")            # any name `sith --model` takes
    model.explain(layers=[-1])                    # heads explained (a table in a notebook)
    model.find("red")                             # which singular vectors write "red"
    model.explain_image("photo.png")              # which heads/vectors make up one image's embedding
    edited = model.edit(suppress=["red"])         # a ready open_clip model + its report
    edited.model                                  # open_clip CLIP, eval mode
    edited.report                                 # what changed (table), edited.report.to_pandas()
    edited.save("red-free")                       # open_clip folder; or "red-free.safetensors"

Every result is a ``ResultTable``: it prints as a text table, renders as an HTML table in Jupyter
(``_repr_html_``), converts with ``.to_pandas()`` (pandas is optional and imported only then) and
``.to_dicts()``, and still holds the engine's own dataclasses (``.items``) for code that wants them.
The model's vocabulary follows the one model-aware rule (``sith.testbed.vocabulary.vocabulary_for``)
unless ``vocabulary=`` says otherwise; decompositions and codes share the CLI's disk cache.
"""

from __future__ import annotations

import dataclasses
import html
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sith.engine.errors import InvalidInput


# ------------------------------------------------------------------------------------- results


def _concepts(pairs: Sequence[Sequence[Any]] | None, digits: int = 2) -> str:
    return ", ".join(f"{c} {float(w):.{digits}f}" for c, w in (pairs or []))


class ResultTable(Sequence):
    """A list of result rows that shows itself as a table (text, HTML) and converts to pandas.

    ``items`` are the engine's objects (dataclasses); ``to_dicts()`` the flat rows shown.
    """

    columns: tuple[str, ...] = ()

    def __init__(self, items: Sequence[Any], title: str = "", notes: Sequence[str] = ()) -> None:
        self.items = list(items)
        self.title = title
        self.notes = list(notes)

    # the rows -------------------------------------------------------------------------------
    def row(self, item: Any) -> dict[str, Any]:
        return dataclasses.asdict(item) if dataclasses.is_dataclass(item) else dict(item)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [self.row(item) for item in self.items]

    def to_pandas(self):
        """The rows as a pandas DataFrame (pandas is an optional dependency)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas, which sith does not install: pip install pandas") from None
        rows = self.to_dicts()
        return pd.DataFrame(rows, columns=list(self.columns) if self.columns else None)

    # Sequence --------------------------------------------------------------------------------
    def __getitem__(self, index):
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    # display ---------------------------------------------------------------------------------
    @staticmethod
    def _cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
            return _concepts(value)
        return "" if value is None else str(value)

    def _table_rows(self) -> tuple[list[str], list[list[str]]]:
        rows = self.to_dicts()
        columns = list(self.columns) or (list(rows[0]) if rows else [])
        return columns, [[self._cell(r.get(c)) for c in columns] for r in rows]

    def __repr__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        columns, rows = self._table_rows()
        table = Table(title=self.title or None)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        buffer = io.StringIO()
        console = Console(file=buffer, width=200, force_terminal=False, color_system=None)
        console.print(table)
        for note in self.notes:
            console.print(f"note: {note}", markup=False)
        return buffer.getvalue().rstrip()

    def _repr_html_(self) -> str:
        columns, rows = self._table_rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
        title = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        notes = "".join(f"<p>note: {html.escape(n)}</p>" for n in self.notes)
        return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


class Explanation(ResultTable):
    """``Model.explain``: one row per explained singular vector; ``items`` (and ``len``) are the heads
    (engine ``HeadSummary``)."""

    columns = ("layer", "head", "index", "sigma", "concepts", "fidelity", "theme")

    def to_dicts(self) -> list[dict[str, Any]]:
        rows = []
        for head in self.items:
            theme = _concepts(head.theme, 3)
            for v in head.vectors:
                rows.append({"layer": v.layer, "head": v.head, "index": v.index, "sigma": v.sigma,
                             "concepts": _concepts(v.concepts), "fidelity": v.fidelity, "theme": theme})
        return rows


class Hits(ResultTable):
    """``Model.find``: singular vectors ranked by relevance (items: engine ``SearchHit``)."""

    columns = ("layer", "head", "index", "sigma", "relevance", "matched", "coefficient", "cosine", "concepts")

    def row(self, hit: Any) -> dict[str, Any]:
        return {"layer": hit.layer, "head": hit.head, "index": hit.index, "sigma": hit.sigma, "relevance": hit.score,
                "matched": hit.matched, "coefficient": hit.coefficient, "cosine": hit.cosine,
                "concepts": _concepts(hit.concepts)}


class ImageExplanation(ResultTable):
    """``Model.explain_image``: the singular vectors with the largest share of one image's embedding.

    ``attribution`` is the engine's full ``ImageAttribution`` (heads, constants, the rest).
    """

    columns = ("layer", "head", "index", "sigma", "coefficient", "share", "concepts")

    def __init__(self, attribution) -> None:
        self.attribution = attribution
        notes = [f"analysed heads {attribution.analysed_share:+.3f}, their constants {attribution.constant_share:+.3f}, "
                 f"everything else {attribution.rest:+.3f} of the embedding",
                 "closest concepts to the image: " + _concepts(attribution.image_concepts)]
        super().__init__(attribution.vectors, f"{attribution.model}: {attribution.image}", notes)

    def row(self, v: Any) -> dict[str, Any]:
        return {"layer": v.layer, "head": v.head, "index": v.index, "sigma": v.sigma, "coefficient": v.coefficient,
                "share": v.share, "concepts": _concepts(v.concepts)}

    @property
    def heads(self) -> ResultTable:
        table = ResultTable([{"layer": h.layer, "head": h.head, "share": h.share, "constant": h.constant,
                              "vectors": "; ".join(f"j={v.index} {v.share:+.3f}: {_concepts(v.concepts)}"
                                                   for v in h.vectors)}
                             for h in self.attribution.heads], f"{self.title}: heads")
        table.columns = ("layer", "head", "share", "constant", "vectors")
        return table


class EditReport(ResultTable):
    """``Model.edit`` / ``Model.preview``: the vectors the edit changes, with α and explanation.

    ``plan`` is the engine's ``EditPlan``; ``to_dict()`` its full JSON form (spec, heads, predicted
    presence, warnings), ``manifest`` what an exported model records.
    """

    columns = ("operation", "layer", "head", "index", "sigma", "alpha", "relevance", "concepts")

    def __init__(self, plan) -> None:
        self.plan = plan
        data = plan.to_dict()
        self._data = data
        notes = [*data.get("warnings", []), *data.get("notes", [])]
        for effect in data.get("predicted", []):
            notes.append(f"{effect.get('role', '')} {effect.get('concept')}: predicted {effect.get('before', 0):.3f}"
                         f" -> {effect.get('after', 0):.3f}")
        super().__init__(data.get("affected", []), f"{data['model']['name']}: edit", notes)

    def row(self, a: dict[str, Any]) -> dict[str, Any]:
        return {"operation": a.get("operation"), "layer": a.get("layer"), "head": a.get("head"),
                "index": a.get("index"), "sigma": a.get("sigma"), "alpha": a.get("alpha"),
                "relevance": a.get("relevance"), "concepts": _concepts(a.get("concepts"))}

    def to_dict(self) -> dict[str, Any]:
        return self._data

    @property
    def manifest(self) -> dict[str, Any]:
        return self.plan.manifest()

    @property
    def alphas(self) -> list[float]:
        """α of every changed vector (the edit's strengths as applied)."""
        return [float(a["alpha"]) for a in self._data.get("affected", [])]


# ------------------------------------------------------------------------------------- models


class Model:
    """One loaded CLIP model with SITH's analyses as methods (see the module docstring).

    ``model`` is the open_clip model (eval mode), ``tokenizer`` and ``preprocess`` its own;
    ``loaded`` the engine's ``LoadedModel``.
    """

    def __init__(self, loaded, vocabulary: str | Sequence[str] | None = None, image_mean: str = "directions",
                 device: str = "cpu", cache: bool = True) -> None:
        self.loaded = loaded
        self.vocabulary = vocabulary
        self.image_mean = image_mean
        self.device = device
        self.cache = cache
        self._analyzer = None

    # the model itself ------------------------------------------------------------------------
    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def preprocess(self):
        return self.loaded.preprocess

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def hash(self) -> str:
        return self.loaded.hash

    def __repr__(self) -> str:
        info = self.loaded.info
        return (f"<sith.{type(self).__name__} {self.name!r}: {info.layers} layers x {info.heads} heads, "
                f"width {info.width}, hash {self.hash[:12]}>")

    # analysis --------------------------------------------------------------------------------
    def concepts(self) -> list[str] | None:
        """The concept list explanations use (None: the engine's English default)."""
        if self.vocabulary is not None and not isinstance(self.vocabulary, str):
            return [str(c) for c in self.vocabulary]
        from sith.testbed.vocabulary import vocabulary_for

        return vocabulary_for(self.loaded, self.vocabulary)

    @property
    def analyzer(self):
        """The engine ``Analyzer`` (dictionary built on first use, then reused by every call)."""
        if self._analyzer is None:
            from sith.engine.analysis import Analyzer
            from sith.engine.cache import DiskCache, data_dir
            from sith.engine.dictionary import build_dictionary

            dictionary = build_dictionary(self.loaded, self.concepts())
            cache = DiskCache(data_dir() / "artifacts") if self.cache else None
            self._analyzer = Analyzer(self.loaded, dictionary, image_mean=self.image_mean, device=self.device,
                                      cache=cache)
        return self._analyzer

    def explain(self, layers: int | Sequence[int] | None = None, heads: int | Sequence[int] | None = None,
                vectors: int = 3, method: str = "comp", k: int | None = None, coherence: float | None = None,
                theme_size: int = 5, fidelity: bool = False) -> Explanation:
        """Heads of ``layers`` (default the last four): each vector as concepts, and each head's theme."""
        extra = _coder_options(k, coherence)
        summaries = self.analyzer.explain(layers, heads, method=method, vectors=vectors, theme_size=theme_size,
                                          with_fidelity=fidelity, **extra)
        return Explanation(summaries, f"{self.name}: heads explained ({method})")

    def find(self, *concepts: str | Sequence[str], layers: int | Sequence[int] | None = None, top: int = 20,
             method: str = "comp", k: int | None = None, coherence: float | None = None,
             free_text: bool = False) -> Hits:
        """Singular vectors ranked by relevance to the concepts: ``model.find("red")`` or ``find("red", "blue")``."""
        names = _flatten(concepts, "concepts")
        hits = self.analyzer.find(names, layers, top=top, method=method, free_text=free_text,
                                  **_coder_options(k, coherence))
        return Hits(hits, f"{self.name}: singular vectors most relevant to {', '.join(names)}")

    def explain_image(self, image: Any, layers: int | Sequence[int] | None = None, top: int = 10,
                      vectors_per_head: int = 3, method: str = "comp", k: int | None = None,
                      coherence: float | None = None) -> ImageExplanation:
        """Which heads and singular vectors make up ``image``'s embedding (a path, PIL image or tensor)."""
        from sith.engine.attribution import attribute_image

        result = attribute_image(self.analyzer, image, layers, top=top, vectors_per_head=vectors_per_head,
                                 method=method, **_coder_options(k, coherence))
        return ImageExplanation(result)

    # editing ---------------------------------------------------------------------------------
    def spec(self, suppress: Sequence[str] | str | None = None, amplify: Sequence[str] | str | None = None,
             flip: Sequence[str] | str | None = None, scale: Sequence[str] | str | None = None,
             debias: Sequence[str] | str | None = None, *,
             strength: float | None = None, top: int | None = None, threshold: float | None = None,
             layers: Sequence[int] | None = None, **options: Any):
        """The ``EditSpec`` the keyword form describes: one operation per action named.

        ``strength`` is α (suppress/flip/scale/amplify alike), ``top``/``threshold`` choose the
        selection rule (default: the planner's), ``layers`` limit it; any other keyword (e.g.
        ``operator``, ``target``, ``preserve``) is passed to every operation as the spec defines it.
        """
        from sith.edits.spec import EditSpec

        if top is not None and threshold is not None:
            raise InvalidInput("top", "give top or threshold, not both")
        operations = []
        for action, concepts in (("suppress", suppress), ("amplify", amplify), ("flip", flip), ("scale", scale),
                                 ("debias", debias)):
            if concepts is None:
                continue
            op: dict[str, Any] = {"concepts": [concepts] if isinstance(concepts, str) else list(concepts),
                                  "action": action, **options}
            if strength is not None:
                op["strength"] = strength
            if layers is not None:
                op["layers"] = list(layers)
            if top is not None:
                op["select"] = {"rule": "top_n", "n": top}
            elif threshold is not None:
                op["select"] = {"rule": "threshold", "threshold": threshold}
            operations.append(op)
        if not operations:
            raise InvalidInput("operations", "nothing to edit: name concepts with suppress=, amplify=, flip=, scale= "
                               "or debias=")
        return EditSpec.from_dict({"model": self.name, "operations": operations})

    def preview(self, suppress=None, amplify=None, flip=None, scale=None, debias=None, *, spec=None,
                **options: Any) -> EditReport:
        """Dry run of ``edit``: which vectors would change and how (no weights touched)."""
        from sith.edits.plan import plan_edit

        spec = spec if spec is not None else self.spec(suppress, amplify, flip, scale, debias, **options)
        return EditReport(plan_edit(self.analyzer, _as_spec(spec)))

    def edit(self, suppress=None, amplify=None, flip=None, scale=None, debias=None, *, spec=None,
             **options: Any) -> EditedModel:
        """Plan and apply an edit: ``model.edit(suppress=["red"])``, ``model.edit(suppress="red",
        strength=0.5)``, or ``model.edit(spec=EditSpec | dict | JSON)``. Returns an ``EditedModel``."""
        import dataclasses as dc

        from sith.edits.apply import apply_multipliers
        from sith.engine.models import vision_hash

        report = self.preview(suppress, amplify, flip, scale, debias, spec=spec, **options)
        plan = report.plan
        clip = apply_multipliers(self.loaded.model, plan.multipliers, plan.decomposition).eval().requires_grad_(False)
        loaded = dc.replace(self.loaded, model=clip, name=f"{self.name}+edit", hash=vision_hash(clip))
        return EditedModel(loaded, report, base=self, vocabulary=self.vocabulary, image_mean=self.image_mean,
                           device=self.device, cache=self.cache)

    def evaluate(self, n_factor: int = 2000, n_spurious: int = 1000, n_retrieval: int = 1000) -> dict[str, Any]:
        """Zero-shot, worst-group and retrieval scores on held-out testbed images (sith.testbed.evaluate)."""
        from sith.testbed.evaluate import evaluate

        return {"model": self.name, "hash": self.hash,
                **evaluate(self.model, self.tokenizer, n_factor=n_factor, n_spurious=n_spurious,
                           n_retrieval=n_retrieval)}

    def save(self, out: str | Path, manifest: dict[str, Any] | None = None) -> Path:
        """Export as a complete open_clip model: a folder, or one ``X.safetensors`` carrying its config."""
        from sith.edits.export import export_model

        return export_model(self.model, out, manifest or {"base_model": self.name, "base_hash": self.hash},
                            self.loaded.config)


class EditedModel(Model):
    """An edited model: ``model`` is ready to use (open_clip, eval mode); ``report`` says what changed.

    It is a ``Model`` too, so ``edited.explain(...)``, ``edited.find(...)`` and ``edited.evaluate()``
    look at the edited weights. ``save`` writes it with its manifest (and multipliers).
    """

    def __init__(self, loaded, report: EditReport, base: Model, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.report = report
        self.base = base

    @property
    def manifest(self) -> dict[str, Any]:
        return self.report.manifest

    @property
    def multipliers(self):
        return self.report.plan.multipliers

    def save(self, out: str | Path, manifest: dict[str, Any] | None = None) -> Path:
        """Write the edited model (folder or ``X.safetensors``) and its multipliers (``X.edit.safetensors``
        beside a file, inside a folder) so the edit can be re-applied, composed or reverted."""
        from sith.edits.export import export_model, multipliers_path

        path = export_model(self.model, out, manifest or self.manifest, self.loaded.config)
        self.multipliers.save(multipliers_path(path))
        return path


# ------------------------------------------------------------------------------------- helpers


def _flatten(values: Sequence[Any], field: str) -> list[str]:
    out: list[str] = []
    for value in values:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, Sequence):
            out.extend(str(v) for v in value)
        else:
            raise InvalidInput(field, f"expected concept names, got {type(value).__name__}")
    if not out:
        raise InvalidInput(field, "give at least one concept")
    return out


def _coder_options(k: int | None, coherence: float | None) -> dict[str, Any]:
    return {name: value for name, value in (("k", k), ("coherence", coherence)) if value is not None}


def _as_spec(spec: Any):
    from sith.edits.spec import EditSpec

    if isinstance(spec, EditSpec):
        return spec
    if isinstance(spec, dict):
        return EditSpec.from_dict(spec)
    if isinstance(spec, str):
        return EditSpec.from_json(spec)
    raise InvalidInput("spec", f"expected an EditSpec, a dict or JSON text, got {type(spec).__name__}")


def load(model: str | Path | None = None, *, device: str = "cpu", vocabulary: str | Sequence[str] | None = None,
         image_mean: str = "directions", cache: bool = True) -> Model:
    """Load a model by any name the CLI takes (``sith.engine.models.load_reference``): "testbed-main"
    (the default), "testbed-small", an open_clip name[/tag], "hf-hub:ORG/REPO", a folder, or an
    exported .safetensors file. ``vocabulary``: None (the model decides), "default", "testbed", a
    word-list file, or a list of concepts."""
    from sith.engine.models import load_reference

    if model is not None and not isinstance(model, (str, Path)):
        raise InvalidInput("model", f"expected a model name or path, got {type(model).__name__}")
    loaded = load_reference(None if model is None else str(model), device)
    return Model(loaded, vocabulary=vocabulary, image_mean=image_mean, device=device, cache=cache)
