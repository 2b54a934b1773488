"""The DuoAttention recipe of configs/duo/tiny.py on run 3 of the embedded model
(jaxkv/assets/tiny_run3), niah_multikey in its plain form: what trained the gates of the published
figures (jaxkv/assets/tiny_run3/gates_duo.json).

    python -m train duo --config configs/duo/tiny_run3.py --out runs/duo_tiny_run3
"""
from configs.duo.tiny import CONFIG as DEFAULT
from configs.duo.tiny import retrieval_tasks

CONFIG = DEFAULT.replace(model="tiny_run3", tasks=retrieval_tasks(()))
