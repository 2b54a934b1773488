"""Does a short fine-tune teach the embedded model key matching? (issue 2: niah_multikey)

Fine-tunes run 3 of the embedded model (`tiny_run3`) (or a random init) on one niah_multikey curriculum variant and
prints, every `--every` steps, teacher-forced exact match of the answer on 64 fixed examples of
each probe setting, then the per-token accuracy of the target at the end (which step fails).
Teacher-forced exact match over the answer equals greedy exact match of that answer.

    python benchmarks/keymatch_probe.py --variant plain   --steps 300   # 2-8 keys of 3 letters
    python benchmarks/keymatch_probe.py --variant queries --steps 500   # 1-letter keys, 2-4 queries
    python benchmarks/keymatch_probe.py --variant quote   --steps 1000  # answer quotes the needle
    python benchmarks/keymatch_probe.py --variant adjacent --steps 400  # quote, no "=" in needles
    python benchmarks/keymatch_probe.py --variant scratch --steps 400   # random init, 1-letter keys

Writes `--out`/results.json (the curves and the per-token accuracies) and accuracy.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mk(length, n_keys, key_len=3, n_queries=1, quote=False, equals=True, alphabet="letters"):
    from train.pretrain import TaskMix
    settings = (("length", length), ("n_keys", n_keys), ("key_len", key_len),
                ("n_queries", n_queries))
    settings += (("quote", True),) if quote else ()
    settings += (("equals", False),) if not equals else ()
    settings += (("key_alphabet", alphabet),) if alphabet != "letters" else ()
    return TaskMix("niah_multikey", 1.0, settings)


# variant -> (training tasks, probe tasks, seq_len, peak learning rate, from scratch)
VARIANTS = {
    "plain": ((_mk(96, 2), _mk(96, 4), _mk(96, 8)),
              (_mk(96, 2), _mk(96, 4), _mk(96, 8), _mk(224, 8)), 112, 1e-3, False),
    "queries": ((_mk(64, 4, 1, 4), _mk(80, 8, 1, 3), _mk(64, 2, 1, 2)),
                (_mk(64, 2, 1), _mk(64, 4, 1), _mk(80, 8, 1), _mk(96, 8)), 112, 2e-3, False),
    "quote": ((_mk(64, 4, 1, quote=True), _mk(80, 8, 1, quote=True), _mk(96, 8, quote=True)),
              (_mk(64, 4, 1, quote=True), _mk(80, 8, 1, quote=True), _mk(96, 8, quote=True),
               _mk(224, 8, quote=True)), 128, 1e-3, False),
    "adjacent": ((_mk(64, 4, 1, quote=True, equals=False), _mk(80, 8, 1, quote=True, equals=False),
                  _mk(96, 8, quote=True, equals=False)),
                 (_mk(64, 4, 1, quote=True, equals=False), _mk(80, 8, 1, quote=True, equals=False),
                  _mk(96, 8, quote=True, equals=False)), 128, 1e-3, False),
    "scratch": ((_mk(64, 4, 1, 4), _mk(64, 4, 1), _mk(80, 6, 1)),
                (_mk(64, 4, 1), _mk(80, 6, 1), _mk(96, 8)), 112, 3e-3, True),
    "index": ((_mk(64, 4, 1, 1, True, False, "index"), _mk(80, 8, 1, 1, True, False, "index"),
               _mk(96, 8, 2, 1, True, False, "index")),
              (_mk(64, 4, 1, 1, True, False, "index"), _mk(80, 8, 1, 1, True, False, "index"),
               _mk(96, 8, 2, 1, True, False, "index")), 128, 1e-3, False),
    "mqar": ((_mk(64, 2, 1, 2), _mk(64, 4, 1, 4), _mk(64, 6, 1, 6)),
             (_mk(64, 2, 1), _mk(64, 4, 1), _mk(64, 6, 1), _mk(64, 6, 1, 6)), 128, 1e-3, True),
    "mqar_adjacent": (
        (_mk(64, 2, 1, 2, True, False), _mk(64, 4, 1, 4, True, False),
         _mk(64, 6, 1, 4, True, False)),
        (_mk(64, 2, 1, quote=True, equals=False), _mk(64, 4, 1, quote=True, equals=False),
         _mk(64, 6, 1, quote=True, equals=False), _mk(64, 6, 1, 4, True, False)), 144, 1e-3, True),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="quote")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--out", default="runs/keymatch_probe")
    p.add_argument("--start", default=None,
                   help="fine-tune the weights of this Hugging Face-style folder (e.g. exported "
                        "by induction_plateau.py --save) instead of the variant's start")
    p.add_argument("--init-std", type=float, default=None,
                   help="scratch variants: draw every projection kernel from normal(std) "
                        "(Hugging Face's initializer_range init) instead of lecun_normal")
    p.add_argument("--induction", type=float, default=0.0,
                   help="fraction of each batch replaced by dense chunk-copy rows (induction "
                        "supervision on every copied token, see induction_rows)")
    args = p.parse_args(argv)
    if not 0.0 <= args.induction < 1.0:
        raise ValueError(f"--induction={args.induction}: expected a fraction in [0, 1)")
    if args.steps < 1 or args.every < 1:
        raise ValueError(f"--steps={args.steps}, --every={args.every}: both must be >= 1")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from configs.tiny_run3 import CONFIG as BASE
    from jaxkv.embedded import load_embedded
    from jaxkv.model import Decoder, init_params
    from jaxkv.model.decoder import normal_kernels
    from jaxkv.tasks import make_training_batch, sample_examples
    from train.pretrain import Stage, batch_for_step, make_optimizer, make_train_step
    from induction_plateau import induction_rows
    from per_token import accuracy_by_place

    train_tasks, probe_tasks, seq_len, lr, scratch = VARIANTS[args.variant]
    cfg = BASE.replace(stages=(Stage(steps=args.steps, seq_len=seq_len, tasks=train_tasks),),
                       learning_rate=lr, warmup_steps=30, schedule_steps=None,
                       restart_learning_rate=None)
    if args.start:
        from jaxkv.hf import load_hf
        init_model = load_hf(args.start, dtype=cfg.model.dtype)
        if init_model.config != cfg.model:
            raise ValueError(f"--start={args.start}: its model ({init_model.config}) is not the "
                             f"embedded architecture ({cfg.model})")
        params = init_model.params
    else:
        params = init_params(cfg.model, 0) if scratch else load_embedded(name="tiny_run3").params
    if args.init_std is not None:
        params = normal_kernels(params, args.init_std, seed=1)
    optimizer = make_optimizer(cfg)
    step_fn = make_train_step(cfg, optimizer)
    opt_state = optimizer.init(params)

    probes = []
    for t in probe_tasks:
        task = t.make()
        examples = sample_examples(task, 64, 999)
        batch = make_training_batch(examples, task.max_len)
        answer_len = len(examples[0].target_ids) - 1  # the first answer, <eos> left out
        probes.append((t.label, batch, answer_len, examples[0].target.split() + ["<eos>"]))

    @jax.jit
    def token_ok(params, tokens):
        logits = Decoder(cfg.model).apply({"params": params}, tokens[:, :-1],
                                          method=Decoder.forward)
        return logits.argmax(-1) == tokens[:, 1:]

    def measure(params):
        """(exact match and token accuracy per probe, the per-token correctness arrays)."""
        out, oks = {}, {}
        for label, batch, answer_len, _ in probes:
            ok = oks[label] = np.asarray(token_ok(params, jnp.asarray(batch["tokens"])))
            mask = batch["loss_mask"][:, :-1] > 0
            k = np.cumsum(mask, axis=1) * mask  # 1, 2, ... along the target
            head = (k >= 1) & (k <= answer_len)
            out[label] = {"exact": float((ok | ~head).all(1).mean()),
                          "token_acc": float(ok[mask].mean())}
        return out, oks

    summary, oks = measure(params)
    curve = [{"step": 0, **summary}]
    t0 = time.time()
    for step in tqdm(range(args.steps), desc=f"probe {args.variant}", dynamic_ncols=True):
        b = batch_for_step(cfg, step)
        if args.induction:
            k = int(round(args.induction * cfg.batch_size))
            b["tokens"][:k], b["loss_mask"][:k] = induction_rows(
                np.random.default_rng([7, step]), k, seq_len)
            b["positions"][:k] = np.arange(seq_len)
        params, opt_state, loss, _ = step_fn(params, opt_state, jnp.asarray(b["tokens"]),
                                             jnp.asarray(b["loss_mask"]),
                                             jnp.asarray(b["positions"]))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            summary, oks = measure(params)  # the last step is always measured
            curve.append({"step": step + 1, "loss": float(loss), **summary})
            print(json.dumps(curve[-1]), flush=True)
    per_token = {}
    for label, batch, _, words in probes:
        per_token[label] = accuracy_by_place(oks[label], batch["loss_mask"], words)
        print(label, " ".join(f"{w}:{a:.2f}" for w, a in per_token[label]))

    os.makedirs(args.out, exist_ok=True)
    result = {"variant": args.variant, "steps": args.steps, "seconds": round(time.time() - t0),
              "curve": curve, "per_token_accuracy_at_end": per_token}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, *_ in probes:
        ax.plot([c["step"] for c in curve], [c[label]["exact"] for c in curve], label=label)
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("answer exact match (teacher-forced)")
    ax.set_title(f"niah_multikey probe: {args.variant}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=120)
    print(f"wrote {args.out}/results.json and accuracy.png")


if __name__ == "__main__":
    main()
