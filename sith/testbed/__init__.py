"""Ground-truth testbed: a synthetic image-caption world with known factors, the CLIP models trained
on it (``checkpoints/``), and the evaluation harness (see docs/testbed.md)."""
