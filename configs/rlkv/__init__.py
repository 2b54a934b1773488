"""RLKV run configurations (python -m train rlkv --config configs/rlkv/NAME.py)."""
