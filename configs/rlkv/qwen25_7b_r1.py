"""RLKV on Qwen-2.5-7B-R1 (DeepSeek-R1-Distill-Qwen-7B) with the published hyperparameters.

    python -m train rlkv --config configs/rlkv/qwen25_7b_r1.py --out runs/rlkv_qwen7b

Identical to configs/rlkv/llama31_8b_r1.py (see there for what is published and what is ours)
except the model and tau = 0.55, the paper's threshold for this model.
"""
from configs.rlkv.llama31_8b_r1 import CONFIG as _LLAMA

MODEL_DIR = "checkpoints/DeepSeek-R1-Distill-Qwen-7B"

CONFIG = _LLAMA.replace(model=MODEL_DIR, tau=0.55)
