"""Quick end-to-end check of the evaluation pipeline on a trained model: full cache against
StreamingLLM and random head choice at three budgets, on the two simplest retrieval tasks.

    python benchmarks/retrieval_smoke.py --model runs/tiny/model --out runs/eval_smoke
"""
import argparse

from jaxkv.eval import EvalConfig, evaluate, format_table
from jaxkv.hf import load_hf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/tiny/model")
    p.add_argument("--out", default="runs/eval_smoke")
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args(argv)
    cfg = EvalConfig(methods=("full", "streaming", "random_heads"), budgets=(0.25, 0.5, 0.75),
                     tasks=("niah_single", "passkey"),
                     task_settings={"niah_single": {"length": 224}, "passkey": {"length": 224}},
                     n_samples=args.n, batch_size=args.n, seed=0, out_dir=args.out)
    print(format_table(evaluate(load_hf(args.model), cfg, progress=True)))


if __name__ == "__main__":
    main()
