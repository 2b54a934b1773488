"""Heat maps of head gates side by side (layers x KV heads, one colour scale), the heads that
stream at --sparsity marked.

    python benchmarks/gate_heatmap.py --model smollm2-135m-instruct --out docs/gates_smollm2.png
    python benchmarks/gate_heatmap.py --gates RLKV=runs/rlkv/gates.json Duo=runs/duo/gates.json

Default panels: the RLKV and DuoAttention gate files shipped for --model (those it has).
`python -m train rlkv|duo` writes OUT/gates.png of its own gates at the end of a run.
"""
from __future__ import annotations

import argparse

from jaxkv.policies.rlkv import load_gates, plot_gates, shipped_gate_file

TITLES = {"rlkv": "RLKV (GRPO)", "duo": "DuoAttention (distillation)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="the model whose shipped gates to plot (and to check files against)")
    ap.add_argument("--gates", nargs="*", default=None, metavar="TITLE=PATH",
                    help="gate files to plot instead of the shipped ones")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="mark the heads streaming at this sparsity (negative: none)")
    ap.add_argument("--out", default="runs/gates.png")
    args = ap.parse_args(argv)
    import jaxkv
    model = jaxkv.load(args.model)
    panels = []
    if args.gates:
        for item in args.gates:
            title, eq, path = item.partition("=")
            if not eq:
                raise SystemExit(f"--gates {item!r}: give TITLE=PATH")
            panels.append((title, load_gates(path, model)))
    else:
        for method in ("rlkv", "duo"):
            path = shipped_gate_file(method, model)
            if path is not None:
                panels.append((TITLES[method], load_gates(path, model)))
        if not panels:
            raise SystemExit(f"no gate files shipped for {args.model}: give --gates TITLE=PATH")
    print(plot_gates(panels, args.out, None if args.sparsity < 0 else args.sparsity))


if __name__ == "__main__":
    main()
