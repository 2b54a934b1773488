"""configs/eval_quant_tiny.py on the tasks run 1's model solves (configs/eval_rdkv_run1.py)."""
from configs.eval_rdkv_run1 import QUANT as CONFIG  # noqa: F401
