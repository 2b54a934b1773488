"""The RLKV recipe of configs/rlkv/tiny.py on run 3 of the embedded model (jaxkv/assets/tiny_run3),
var_chain in its forward form (the one run 3 was trained on): what trained the gates of the
published RLKV figures (jaxkv/assets/tiny_run3/gates_rlkv.json).

    python -m train rlkv --config configs/rlkv/tiny_run3.py --out runs/rlkv_tiny_run3
"""
from configs.rlkv.tiny import CONFIG as DEFAULT
from configs.rlkv.tiny import reasoning_data

CONFIG = DEFAULT.replace(model="tiny_run3", data=reasoning_data(()))
