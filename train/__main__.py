"""`python -m train <command> [options]`. Commands: pretrain, eval, demo."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train the embedded default model (resumable)")
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--out", default="runs/tiny", help="run folder: checkpoints/, model/, logs")
    p.add_argument("--max-steps", type=int, default=None, help="stop early at this step")
    p.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="methods x budgets x tasks -> results.json + plot")
    e.add_argument("--config", default="configs/eval_tiny.py")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--model", default=None, help="local HF-style folder (default: embedded)")
    e.add_argument("--n", type=int, default=None, help="override samples per point")
    e.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("demo", help="train the embedded model if absent, then evaluate")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=None, help="samples per point (default: config)")

    args = parser.parse_args(argv)
    if args.command == "pretrain":
        from train.config_loading import load_config
        from train.pretrain import pretrain
        pretrain(load_config(args.config), args.out, max_steps=args.max_steps,
                 progress=not args.no_progress)
    elif args.command == "eval":
        from train.evaluate import run_eval
        run_eval(args.config, args.out, model_path=args.model, n=args.n,
                 progress=not args.no_progress)
    elif args.command == "demo":
        from train.demo import run_demo
        run_demo(args.out, n=args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
