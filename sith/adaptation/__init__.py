"""Model adaptation and universality: what fine-tuning changed in each head, and which heads of two
different models encode the same concepts (spec §5, §8)."""
