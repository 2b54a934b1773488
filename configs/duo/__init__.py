"""DuoAttention run configurations (python -m train duo --config configs/duo/NAME.py)."""
