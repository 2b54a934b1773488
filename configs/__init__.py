"""Run configurations: Python dataclasses, one module per model / run."""
