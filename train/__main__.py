"""`python -m train <command> [options]`. Commands: pretrain, rlkv, duo, eval, calibrate, demo."""
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

    for name, help_, default in (
            ("rlkv", "learn per-head gates by RL (GRPO + reward-adaptive L1), resumable",
             "configs/rlkv/tiny.py"),
            ("duo", "DuoAttention baseline: gates by hidden-state distillation, resumable",
             "configs/duo/tiny.py")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("--config", default=default)
        g.add_argument("--out", required=True, help="run folder: checkpoints/, logs, gates.json")
        g.add_argument("--max-steps", type=int, default=None, help="stop early at this step")
        g.add_argument("--model", default=None,
                       help="override the config's model (local HF-style folder or 'embedded')")
        g.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="methods x budgets x tasks -> results.json + plot")
    e.add_argument("--config", default="configs/eval_tiny.py")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--model", default=None, help="local HF-style folder (default: embedded)")
    e.add_argument("--n", type=int, default=None, help="override samples per point")
    e.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("calibrate", help="RDKV eps(b) table of a model -> <model>/rdkv_eps.json")
    c.add_argument("--model", default=None, help="local HF-style folder (default: embedded)")
    c.add_argument("--out", default=None, help="default: <model>/rdkv_eps.json")
    c.add_argument("--n", type=int, default=8, help="prompts per embedded task")
    c.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...} instead of tasks')

    d = sub.add_parser("demo", help="train the embedded model if absent, then evaluate")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=None, help="samples per point (default: config)")

    args = parser.parse_args(argv)
    if args.command == "pretrain":
        from train.config_loading import load_config
        from train.pretrain import pretrain
        pretrain(load_config(args.config), args.out, max_steps=args.max_steps,
                 progress=not args.no_progress)
    elif args.command in ("rlkv", "duo"):
        from train.config_loading import load_config
        cfg = load_config(args.config)
        if args.model is not None:
            cfg = cfg.replace(model=args.model)
        if args.command == "rlkv":
            from train.rlkv import train_rlkv
            train_rlkv(cfg, args.out, max_steps=args.max_steps, progress=not args.no_progress)
        else:
            from train.duo import train_duo
            train_duo(cfg, args.out, max_steps=args.max_steps, progress=not args.no_progress)
    elif args.command == "eval":
        from train.evaluate import run_eval
        run_eval(args.config, args.out, model_path=args.model, n=args.n,
                 progress=not args.no_progress)
    elif args.command == "calibrate":
        from train.calibrate import run_calibration
        run_calibration(args.model, args.out, n=args.n, prompts_file=args.prompts)
    elif args.command == "demo":
        from train.demo import run_demo
        run_demo(args.out, n=args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
