"""Entry points: `python -m train <command>` (pretrain, eval, demo, ...)."""
