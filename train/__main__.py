"""`python -m train <command> [options]`. Commands: pretrain, rlkv, duo, eval, calibrate, demo."""
from __future__ import annotations

import argparse
import sys


def _names(text: str):
    # commas inside [...] belong to a method variant's settings ("snapkv[span=10]")
    names, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            names.append(cur)
            cur = ""
        else:
            cur += ch
    names = [x.strip() for x in names + [cur] if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated names")
    return names


def _ints(text: str):
    try:
        return [int(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers") from None


def _floats(text: str):
    try:
        return [float(x) for x in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers") from None


def _persistent_compilation_cache() -> None:
    """Compiled XLA programs are kept in the user cache folder, so a rerun or a resumed run of a
    command skips most compilation (minutes for a 30-layer model on a CPU)."""
    import os

    import jax

    from jaxkv.paths import user_cache_dir
    if os.environ.get("JAXKV_NO_COMPILATION_CACHE"):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(user_cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


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
        g.add_argument("--steps", type=int, default=None,
                       help="override the config's total steps (a finished run given more "
                            "steps resumes from its last checkpoint and goes on)")
        g.add_argument("--model", default=None,
                       help="override the config's model (local HF-style folder or 'embedded')")
        g.add_argument("--init-gates", default=None, metavar="GATE_FILE",
                       help="start a new run from these gates (e.g. jaxkv's shipped ones or an "
                            "earlier run's gates.json) instead of the config's gate_init; a "
                            "run folder with a checkpoint resumes from it instead")
        g.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", help="methods x budgets x tasks x lengths -> results.json + plot")
    e.add_argument("--config", default=None,
                   help="config module or file (default: configs/eval_tiny.py for the in-house "
                        "models, configs/eval_real.py otherwise); flags override it")
    e.add_argument("--out", default="runs/eval", help="folder: results.json, plot, partial.json")
    e.add_argument("--model", default=None,
                   help="registered name (smollm2-135m-instruct, tiny, ...), folder or .gguf")
    e.add_argument("--tasks", type=_names, default=None, help="comma-separated task names")
    e.add_argument("--lengths", type=_ints, default=None, help="prompt tokens, e.g. 2048,4096")
    e.add_argument("--methods", type=_names, default=None, help="comma-separated method names")
    e.add_argument("--budgets", type=_floats, default=None, help="e.g. 0.1,0.25")
    e.add_argument("--n", type=int, default=None, help="prompts per task and length")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--methods-per-prefill", type=int, default=None,
                   help="run the methods in groups of this many, one prefill per group and batch "
                        "(bounds the memory of compiled programs; default: the config's)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="wrap prompts in the model's chat template (default: when it has one)")
    e.add_argument("--no-chat", dest="chat", action="store_false")
    e.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("calibrate", help="RDKV eps(b) table of a model -> the user cache folder")
    c.add_argument("--model", default=None,
                   help="registered name, folder or .gguf (default: the in-house tiny model)")
    c.add_argument("--out", default=None,
                   help="default: the user cache folder, where rdkv finds it by fingerprint")
    c.add_argument("--n", type=int, default=4, help="prompts per source (docs text, each task)")
    c.add_argument("--length", type=int, default=1024, help="tokens per real-text prompt")
    c.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...} instead')
    c.add_argument("--dtype", default="float32",
                   help="dtype to run the model in (the table is tied to the weights, not the "
                        "dtype)")

    d = sub.add_parser("demo", help="the main job: methods and baselines on the real default "
                                     "model (SmolLM2-135M-Instruct)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=None, help="prompts per task (default: config)")
    d.add_argument("--model", default=None,
                   help="another model (default: smollm2-135m-instruct; 'tiny': the in-house "
                        "model on its own tasks)")

    args = parser.parse_args(argv)
    _persistent_compilation_cache()
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
        if args.steps is not None:
            cfg = cfg.replace(steps=args.steps)  # validated by the config (a positive integer)
        if args.init_gates is not None:
            cfg = cfg.replace(gate_init=args.init_gates)  # validated: an existing gate file
        if args.command == "rlkv":
            from train.rlkv import train_rlkv
            train_rlkv(cfg, args.out, max_steps=args.max_steps, progress=not args.no_progress)
        else:
            from train.duo import train_duo
            train_duo(cfg, args.out, max_steps=args.max_steps, progress=not args.no_progress)
    elif args.command == "eval":
        from train.evaluate import run_eval
        run_eval(args.config, args.out, model_path=args.model, progress=not args.no_progress,
                 n=args.n, tasks=args.tasks, lengths=args.lengths, methods=args.methods,
                 budgets=args.budgets, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, seed=args.seed, chat=args.chat,
                 methods_per_prefill=args.methods_per_prefill)
    elif args.command == "calibrate":
        from train.calibrate import run_calibration
        run_calibration(args.model, args.out, n=args.n, length=args.length,
                        prompts_file=args.prompts, dtype=args.dtype)
    elif args.command == "demo":
        from train.demo import run_demo
        run_demo(args.out, n=args.n, model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
