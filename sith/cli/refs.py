"""How every `sith` command turns its model options into a loaded model: one parser for all.

A model is named by one string everywhere (``sith.engine.models.load_reference``): ``testbed-main``
or any other shipped checkpoint folder name, ``default``, an open_clip name or ``name/pretrained``,
``hf-hub:ORG/REPO``, a folder, a config JSON or a single .safetensors file that carries its config
(``sith edit apply --out X.safetensors``). ``--pretrained``, ``--checkpoint`` and ``--config`` only
refine that string, so ``sith find red --model testbed-main`` and ``sith adapt delta testbed-main X``
read the same name the same way.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sith.engine.errors import InvalidInput


def load_cli_model(model: str | None, pretrained: str | None = None, checkpoint: str | None = None,
                   config: str | None = None, device: str = "cpu"):
    """The model named by the shared CLI options (see the module docstring)."""
    from sith.engine.models import load_model, load_reference, shipped_folder

    if pretrained is not None and model is None:
        raise InvalidInput("--pretrained", "a pretrained tag needs --model NAME (e.g. --model ViT-B-32 --pretrained openai)")
    if checkpoint is None and config is None:
        return load_reference(model if pretrained is None else f"{model}/{pretrained}", device)
    if checkpoint is not None and Path(checkpoint).expanduser().is_dir():
        if model is not None or config is not None or pretrained is not None:
            raise InvalidInput("--checkpoint", "a checkpoint folder is a whole model; give it without --model/--config")
        return load_reference(str(checkpoint), device)
    folder = shipped_folder(model)
    if folder is not None and config is None:  # a shipped architecture with other weights
        return load_model(config=folder, checkpoint=checkpoint, device=device)
    if model in ("default",) and config is None:
        from sith.engine.models import TESTBED_DIR

        return load_model(config=TESTBED_DIR, checkpoint=checkpoint, device=device)
    return load_model(model, pretrained, checkpoint=checkpoint, config=config, device=device)


def checkpoint_folder(ref: str) -> Path | None:
    """The checkpoint folder a reference names directly (a shipped name, ``default`` or a folder path)."""
    from sith.engine.models import TESTBED_DIR, is_checkpoint_folder, shipped_folder

    text = (ref or "").strip()
    if text in ("", "default"):
        return TESTBED_DIR
    folder = shipped_folder(text)
    if folder is not None:
        return folder
    path = Path(text).expanduser()
    return path if is_checkpoint_folder(path) else None


@contextlib.contextmanager
def as_folder(ref: str, field: str = "model") -> Iterator[Path]:
    """A checkpoint folder (open_clip or transformers layout) holding the referenced model, for code
    that reads folders (fine-tuning).

    Folders and shipped names are used in place; anything else (a single-file export, an open_clip
    name, hf-hub:...) is loaded and written to a temporary folder that is removed afterwards.
    """
    folder = checkpoint_folder(ref)
    if folder is not None:
        yield folder
        return
    from sith.edits.export import export_folder
    from sith.engine.models import load_reference

    loaded = load_reference(ref)
    if loaded.config is None:
        raise InvalidInput(field, f"cannot tell the open_clip architecture of {ref!r}")
    with tempfile.TemporaryDirectory(prefix="sith-model-") as tmp:
        yield export_folder(loaded.model, Path(tmp) / Path(loaded.name.replace("/", "-")).name,
                            {"source": ref, "base_hash": loaded.hash}, loaded.config)
