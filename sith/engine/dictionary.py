"""Concept dictionaries: vocabularies, fast text encoding, and the centred atoms COMP decomposes over (spec §2).

Concepts are encoded as raw strings (no prompt template) with ``encode_text(normalize=False)``;
Ē = normalise(E) and D̂ = normalise(Ē − mean(Ē)), so the text side is centred by its own mean just
as directions are centred by the image mean.

Cut context: CLIP's text tower is causal and pools one token (the EOT, found by argmax), so tokens
after the EOT never influence the pooled output. ``encode_texts`` therefore runs each batch only up
to its longest EOT position instead of the full 77 tokens, slicing token ids, positional embedding
and causal mask alike; results equal ``model.encode_text`` (see tests) at a fraction of the cost for
the short strings dictionaries hold. Models that pool the last token or have no causal mask fall
back to the full context.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
import weakref
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor

from sith.engine.cache import (
    ArtifactCache,
    DiskCache,
    data_dir,
    tensors_from_bytes,
    tensors_metadata,
    tensors_to_bytes,
)
from sith.engine.errors import InvalidInput
from sith.engine.models import text_hash

DEFAULT_VOCABULARY_SIZE = 20_000
# progress(description, total) -> advance(n): how callers (CLI bars) follow long encodings.
Progress = Callable[[str, int], Callable[[int], None]]
DICTIONARY_FORMAT = "dict-v2"
# Encoding precision: "fp32"; "fp16" (autocast, CUDA only: about 2x the throughput of fp32 there);
# "auto" = fp16 on a CUDA device, fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "fp16")
GPU_BATCH_SIZE = 2048
CPU_BATCH_SIZE = 256

# Function words carry no visual concept; dropping them keeps the default vocabulary content-bearing.
STOP_WORDS = frozenset(
    """
    about above after again against all also am an and any are aren as at be because been before being
    below between both but by can cannot could did didn do does doesn doing don down during each either
    else ever every few for from further get got had hadn has hasn have haven having he her here hers
    herself him himself his how however if in into is isn it its itself just let like may me might mine
    more most much must mustn my myself neither no nor not now of off often on once one only or other
    ought our ours ourselves out over own per rather same shall shan she should shouldn since so some
    such than that the their theirs them themselves then there these they this those though through thus
    to too under until up upon us very was wasn we were weren what whatever when whenever where whereas
    wherever whether which while who whoever whom whose why will with within without won would wouldn yet
    you your yours yourself yourselves ll ve re
    """.split()
)
_WORD = re.compile(r"[a-z]+")


@dataclass
class ConceptDictionary:
    concepts: list[str]
    embeddings: Tensor  # [N, D] normalised, not centred (Ē)
    centred: Tensor  # [N, D] normalise(Ē − mean(Ē)) (D̂): the atoms COMP decomposes over
    hash: str  # sha256 of the concept list
    _positions: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def index(self, concept: str) -> int:
        if not self._positions:
            self._positions = {c: i for i, c in enumerate(self.concepts)}
        key = concept.strip()
        if key not in self._positions:
            raise InvalidInput("concept", f"{concept!r} is not in the dictionary", suggestions=self.closest(key))
        return self._positions[key]

    def closest(self, text: str, n: int = 5) -> list[str]:
        """Suggestions for a mistyped concept: by spelling first (edit distance with transpositions,
        so "rde" -> "red" before "order"), ties and the rest by difflib's similarity ratio."""
        return closest_words(text, self.concepts, n)

    def __len__(self) -> int:
        return len(self.concepts)


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent
    transpositions each cost 1 (a swapped pair of letters is one typo, not two)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def closest_words(text: str, words: Sequence[str], n: int = 5) -> list[str]:
    """Words within a small edit distance of ``text`` (at most 1 for short words, about a third of
    the length for longer ones), nearest first; difflib's close matches fill the remaining places."""
    key = text.strip().lower()
    if not key or n <= 0:
        return []
    limit = max(1, min(3, len(key) // 3))
    scored = []
    for word in words:
        if abs(len(word) - len(key)) > limit:
            continue
        distance = edit_distance(key, word.lower())
        if distance <= limit:
            scored.append((distance, -difflib.SequenceMatcher(None, key, word.lower()).ratio(), word))
    picked = [w for _, _, w in sorted(scored)[:n]]
    for word in difflib.get_close_matches(key, list(words), n=n, cutoff=0.6):
        if len(picked) >= n:
            break
        if word not in picked:
            picked.append(word)
    return picked


def default_vocabulary(size: int = DEFAULT_VOCABULARY_SIZE) -> list[str]:
    """The ``size`` most frequent English words (wordfreq 3.1.1, "best" list) that pass the filter.

    Filter: lowercase ASCII letters only (drops numbers, punctuation, contractions and non-Latin
    scripts), at least 3 letters, not a stop word (``STOP_WORDS``), duplicates dropped keeping
    frequency order. Deterministic for a given wordfreq version.
    """
    import wordfreq

    n = size * 2
    while True:
        words = list(dict.fromkeys(w for w in wordfreq.top_n_list("en", n) if _keep(w)))
        if len(words) >= size or n >= 1_000_000:
            return words[:size]
        n *= 2


def _keep(word: str) -> bool:
    return len(word) >= 3 and _WORD.fullmatch(word) is not None and word not in STOP_WORDS


def clean_concepts(lines: Iterable[str]) -> list[str]:
    """Strip, skip blanks and ``#`` comments, de-duplicate keeping the first occurrence."""
    concepts: list[str] = []
    seen: set[str] = set()
    for line in lines:
        if not isinstance(line, str):
            raise InvalidInput("dictionary", f"concepts must be strings, got {type(line).__name__}")
        text = line.strip()
        if not text or text.startswith("#") or text in seen:
            continue
        seen.add(text)
        concepts.append(text)
    if len(concepts) < 2:
        raise InvalidInput("dictionary", f"needs at least 2 distinct concepts, got {len(concepts)} "
                           "(centring by the dictionary mean leaves nothing of a single concept)")
    return concepts


def read_vocabulary(path: str | Path) -> list[str]:
    """A UTF-8 text file, one concept per line (``clean_concepts`` rules)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInput("dictionary", f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("dictionary", f"cannot read {path} as UTF-8 text: {exc}") from exc
    return clean_concepts(text.splitlines())


def concepts_hash(concepts: Sequence[str]) -> str:
    """sha256 of the ordered list (JSON-encoded, so a concept holding a newline cannot alias two)."""
    return hashlib.sha256(json.dumps(list(concepts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _pool_positions(model, tokens: Tensor) -> Tensor | None:
    """Index of the pooled token per row, or None when later tokens can influence the output."""
    if getattr(model, "attn_mask", None) is None:
        return None  # bidirectional text tower: padding is attended to
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if model.text_pool_type == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    if model.text_pool_type == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long)
    return None


def _token_table_size(model) -> int | None:
    """Rows of the text tower's token embedding, where the layout is a known one (open_clip CLIP, a
    custom text tower, transformers), else None."""
    for owner in (model, getattr(model, "text", None), getattr(getattr(getattr(model, "hf", None), "text_model", None),
                                                               "embeddings", None)):
        table = getattr(owner, "token_embedding", None)
        if isinstance(table, torch.nn.Embedding):
            return table.num_embeddings
    return None


def encode_tokens(model, tokens: Tensor) -> Tensor:
    """open_clip's ``CLIP.encode_text`` (normalize=False) on tokens cut to any length ≥ the pooled position."""
    rows = _token_table_size(model)
    if rows is not None and tokens.numel() and int(tokens.max()) >= rows:
        raise InvalidInput("model", f"the tokenizer produced token id {int(tokens.max())} but the text tower's token "
                           f"embedding has only {rows} rows: the tokenizer does not belong to this text tower "
                           "(check the model config's text vocab_size or the tokenizer files)")
    if not hasattr(model, "token_embedding"):  # custom/HF text towers (CoCa, CLIPA, SigLIP, transformers)
        return model.encode_text(tokens)
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "fp16" for this device (``PRECISIONS``); fp16 needs CUDA (CPU half matmuls are slow)."""
    if precision not in PRECISIONS:
        raise InvalidInput("precision", f"expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    on_cuda = torch.device(device).type == "cuda"
    if precision == "auto":
        return "fp16" if on_cuda else "fp32"
    if precision == "fp16" and not on_cuda:
        raise InvalidInput("precision", "fp16 encoding needs a CUDA device; use fp32 (or auto) on the CPU")
    return precision


def encode_texts(
    loaded,
    texts: Sequence[str],
    batch_size: int | None = None,
    cut_context: bool = True,
    progress: Progress | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Raw ``encode_text`` output [N, D] float32 on the CPU for ``texts``, in their order; cut context
    unless disabled. ``precision="fp16"`` runs the tower under CUDA autocast (weights untouched)."""
    model = loaded.model
    device = next(model.parameters()).device
    half = resolve_precision(precision, device) == "fp16"
    if batch_size is None:
        batch_size = GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
    tokens = loaded.tokenizer(list(texts))
    positions = _pool_positions(model, tokens) if cut_context else None
    if positions is None:
        positions = torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    order = torch.argsort(positions, stable=True)  # similar lengths share a batch
    out: Tensor | None = None
    advance = progress("Encoding concepts", len(texts)) if progress is not None else None
    autocast = torch.autocast("cuda", dtype=torch.float16) if half else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            length = int(positions[rows].max()) + 1
            embedded = encode_tokens(model, tokens[rows, :length].to(device)).float().cpu()
            if out is None:
                out = embedded.new_empty(len(texts), embedded.shape[-1])
            out[rows] = embedded
            if advance is not None:
                advance(len(rows))
    if out is None:
        raise InvalidInput("dictionary", "no texts to encode")
    return out


def _dictionary_from(concepts: list[str], embeddings: Tensor, digest: str) -> ConceptDictionary:
    normed = F.normalize(embeddings.float(), dim=-1)
    centred = F.normalize(normed - normed.mean(dim=0, keepdim=True), dim=-1)
    return ConceptDictionary(concepts=concepts, embeddings=normed, centred=centred, hash=digest)


_TEXT_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TEXT_HASH_LOCK = threading.Lock()


def text_tower_hash(loaded) -> str:
    """``text_hash`` of the model, computed once per model object (hashing a ViT-L-14 text tower
    reads ~0.5 GB); recomputed if a parameter was replaced or changed in place since."""
    model = loaded.model
    params = [p for name, p in model.named_parameters() if not name.startswith("visual.")]
    state = (tuple(p.data_ptr() for p in params), tuple(p._version for p in params))
    with _TEXT_HASH_LOCK:
        known = _TEXT_HASHES.get(model)
        if known is not None and known[0] == state:
            return known[1]
    digest = text_hash(model)
    with _TEXT_HASH_LOCK:
        _TEXT_HASHES[model] = (state, digest)
    return digest


def dictionary_cache_key(loaded, digest: str) -> str:
    """(text-tower hash, vocabulary hash): what the embeddings depend on, so every model sharing a
    text tower (fine-tuned or edited vision towers, other processes, other workers) shares them."""
    return f"dictionary/{DICTIONARY_FORMAT}/{text_tower_hash(loaded)}/{digest}"


def _accepts(stored: str, requested: str) -> bool:
    """An fp32 entry serves every request; an fp16 one serves all but an explicit "fp32"."""
    return stored == "fp32" or requested != "fp32"


def build_dictionary(
    loaded,
    concepts: Sequence[str] | str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache: ArtifactCache | None = None,
    progress: Progress | None = None,
    precision: str = "auto",
) -> ConceptDictionary:
    """Encode a vocabulary (default ``default_vocabulary()``, a list, or a text file) and centre it.

    Embeddings are cached under (text-tower hash, concept-list hash) (``dictionary_cache_key``):
    in ``cache`` when given (the workers pass Redis, so every worker and the server share one
    copy), else on disk in ``cache_dir`` (default ``$SITH_DATA_DIR/dictionaries``, i.e.
    ``~/.cache/sith/dictionaries``, shared by every local process). ``precision`` (``PRECISIONS``):
    "auto" encodes in half precision on a GPU; an entry encoded in fp16 is reused by any request
    but an explicit "fp32", which re-encodes and replaces it.
    """
    if concepts is None:
        concepts = default_vocabulary()
    elif isinstance(concepts, (str, Path)):
        concepts = read_vocabulary(concepts)
    else:
        concepts = clean_concepts(concepts)
    digest = concepts_hash(concepts)
    store = cache if cache is not None else DiskCache(Path(cache_dir) if cache_dir else data_dir() / "dictionaries")
    key = dictionary_cache_key(loaded, digest)
    wanted = resolve_precision(precision, next(loaded.model.parameters()).device)
    cached = store.get(key)
    if cached is not None:
        entry = _read_entry(cached)
        if entry is not None and entry[0].shape[0] == len(concepts) and _accepts(entry[1], precision):
            return _dictionary_from(concepts, entry[0], digest)
    embeddings = encode_texts(loaded, concepts, progress=progress, precision=wanted)
    store.put(key, tensors_to_bytes({"embeddings": embeddings},
                                    {"format": DICTIONARY_FORMAT, "concepts_sha256": digest, "precision": wanted}))
    return _dictionary_from(concepts, embeddings, digest)


def _read_entry(data: bytes) -> tuple[Tensor, str] | None:
    """(embeddings, precision) of a cached entry, or None when it is unreadable (then re-encoded)."""
    try:
        metadata = tensors_metadata(data)
        embeddings = tensors_from_bytes(data)["embeddings"]
    except Exception:  # truncated or foreign bytes under our key: treat as a miss
        return None
    return embeddings, metadata.get("precision", "fp32")
