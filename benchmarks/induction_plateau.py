"""How long is the induction plateau of the embedded model's architecture? (issue 2: key matching)

Every key-matching task (niah_multikey, var_chain, variable_tracking, niah_multivalue's order)
needs a content look-up: attend to the earlier occurrence of a token and read what follows it (an
induction head). This trains the embedded architecture (configs/tiny_run3.py; `--layers` to
change its depth) from a random init on nothing but dense induction rows (`induction_rows`: a
random sequence of distinct words, then chunks of it in shuffled order, the loss on every copied
token that follows from the previous one), and prints the loss and the accuracy on those tokens.
Chance is about 1/228 (the word pool); a formed induction head gives ~1.0.

    python benchmarks/induction_plateau.py --batch 32  --steps 2000 --layers 2
    python benchmarks/induction_plateau.py --batch 256 --steps 700

Writes `--out`/results.json (the curve) and plateau.png; `--save DIR` exports the weights, which
`python benchmarks/keymatch_probe.py --start DIR` fine-tunes on key matching (does a formed
induction head transfer to it?).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def induction_rows(rng, n_rows, seq_len, chunk=4, starts="aligned"):
    """Dense induction supervision, tokens int32 [n_rows, seq_len] and loss mask float32 (the
    `make_training_batch` convention: mask[t] = 1 trains the prediction of tokens[t + 1]).

    Each row: `<bos>`, a sequence of about 0.6 * seq_len distinct words of the
    `induction_copy` task's pool (`COPY_WORDS`), then chunks of `chunk` words of it in shuffled order.
    Inside a copied chunk each word follows from the previous one by content only (the chunk
    order is random, so no fixed offset finds it); the mask covers those words, not a chunk's
    first word (which is a random pick).

    starts: "aligned" (chunks start at multiples of `chunk` in the source, as in every figure
    before session 17) or "random" (any source position, chunks may overlap). Aligned chunks leave
    a shortcut: a word's slot in its chunk is its source position mod `chunk`, so a model can pick
    a word of the right slot from some chunk without matching content (seen at seq_len 32: all but 2
    of 1,592 wrong predictions were 4, 8 or 12 source positions off, accuracy stuck at ~0.3)."""
    if starts not in ("aligned", "random"):
        raise ValueError(f"induction_rows: starts={starts!r} is not allowed; expected 'aligned' "
                         f"or 'random'")
    import numpy as np
    from jaxkv.tasks.retrieval import COPY_WORDS
    from jaxkv.tasks.vocab import BOS_ID, TOKEN_TO_ID
    if chunk < 2 or seq_len < 4 * chunk:
        raise ValueError(f"induction_rows: chunk={chunk}, seq_len={seq_len} are not allowed; "
                         f"expected chunk >= 2 and seq_len >= 4 * chunk")
    pool = np.array([TOKEN_TO_ID[t] for t in COPY_WORDS], np.int32)
    n_src = min((int(0.6 * seq_len) // chunk) * chunk, (len(pool) // chunk) * chunk)
    n_copy = (seq_len - 1 - n_src) // chunk
    tokens = np.zeros((n_rows, seq_len), np.int32)
    mask = np.zeros((n_rows, seq_len), np.float32)
    start = 1 + n_src
    for b in range(n_rows):
        src = rng.choice(pool, size=n_src, replace=False)
        if starts == "aligned":
            picks = chunk * rng.choice(n_src // chunk, size=n_copy,
                                       replace=n_copy > n_src // chunk)
        else:
            picks = rng.integers(0, n_src - chunk + 1, size=n_copy)
        copy = np.concatenate([src[c:c + chunk] for c in picks])
        tokens[b, :start + len(copy)] = np.concatenate([[BOS_ID], src, copy])
        for c in range(n_copy):  # predictions of a chunk's words 2..chunk
            mask[b, start + c * chunk:start + (c + 1) * chunk - 1] = 1.0
    return tokens, mask


def fresh_rows_report(model_config, params, seq_len, starts, n_rows=256, seed=12345):
    """Accuracy on the copied words of `n_rows` fresh rows, and where the wrong predictions point:
    {offset from the right source word: count} ("not in source" for a word the source lacks). A
    slot shortcut shows as offsets that are multiples of the chunk length."""
    import collections

    import jax.numpy as jnp
    import numpy as np

    from jaxkv.model import Decoder
    tokens, mask = induction_rows(np.random.default_rng(seed), n_rows, seq_len, starts=starts)
    logits = Decoder(model_config).apply({"params": params}, jnp.asarray(tokens[:, :-1]),
                                         method=Decoder.forward)
    pred, want, on = np.asarray(logits.argmax(-1)), tokens[:, 1:], mask[:, :-1] > 0
    offsets = collections.Counter()
    for b in range(n_rows):
        # word -> its position in the source (the words before the first copied one; distinct)
        source = tokens[b, 1:int(np.argmax(on[b]))].tolist()
        where = {w: i for i, w in enumerate(source)}
        for t in np.flatnonzero(on[b] & (pred[b] != want[b])):
            p, w = int(pred[b, t]), int(want[b, t])
            offsets[str(where[p] - where[w]) if p in where else "not in source"] += 1
    return {"seq_len": seq_len, "copy_acc": round(float((pred == want)[on].mean()), 4),
            "wrong_offsets": dict(offsets.most_common())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--layers", type=int, default=None, help="default: configs/tiny_run3.py's 4")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-std", type=float, default=None,
                   help="draw every projection kernel from normal(std) instead of lecun_normal")
    p.add_argument("--starts", choices=("aligned", "random"), default="aligned",
                   help="where copied chunks start in the source (see induction_rows)")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[],
                   help="also measure fresh rows of these lengths at the end (does the head reach "
                        "further than the rows it was trained on?)")
    p.add_argument("--out", default="runs/induction_plateau")
    p.add_argument("--save", default=None,
                   help="export the trained weights here (a Hugging Face-style folder that "
                        "`keymatch_probe.py --start` fine-tunes from)")
    args = p.parse_args(argv)
    for name in ("batch", "steps", "every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)}: must be >= 1")

    import dataclasses

    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from configs.tiny_run3 import CONFIG as BASE
    from jaxkv.model import init_params
    from train.pretrain import Stage, TaskMix, make_optimizer, make_train_step

    model = BASE.model if args.layers is None else dataclasses.replace(
        BASE.model, num_layers=args.layers)
    # the embedded recipe's optimiser (AdamW, warm-up cosine, clipping) at this run's length; the
    # stage only sets that length (the batches are induction rows, not its task)
    cfg = BASE.replace(model=model, batch_size=args.batch, learning_rate=args.lr, warmup_steps=30,
                       stages=(Stage(steps=args.steps, seq_len=args.seq_len,
                                     tasks=(TaskMix("running_sum", 1.0, (("n_digits", 2),)),)),),
                       schedule_steps=None, restart_learning_rate=None)
    optimizer = make_optimizer(cfg)
    step_fn = make_train_step(cfg, optimizer)
    params = init_params(model, 0, kernel_std=args.init_std)
    opt_state = optimizer.init(params)
    positions = jnp.broadcast_to(jnp.arange(args.seq_len), (args.batch, args.seq_len))
    curve, t0 = [], time.time()
    for step in tqdm(range(args.steps), desc=f"induction b{args.batch}", dynamic_ncols=True):
        tokens, mask = induction_rows(np.random.default_rng([3, step]), args.batch, args.seq_len,
                                      starts=args.starts)
        params, opt_state, loss, acc = step_fn(params, opt_state, jnp.asarray(tokens),
                                               jnp.asarray(mask), positions)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "sequences": (step + 1) * args.batch,
                          "loss": round(float(loss), 4), "copy_acc": round(float(acc), 4),
                          "seconds": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)

    fresh = [fresh_rows_report(model, params, n, args.starts)
             for n in [args.seq_len] + args.eval_lengths]
    for r in fresh:
        print(json.dumps({"fresh_rows": r}))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"batch": args.batch, "seq_len": args.seq_len, "layers": model.num_layers,
                   "lr": args.lr, "starts": args.starts, "curve": curve, "fresh_rows": fresh},
                  f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["sequences"] for c in curve], [c["copy_acc"] for c in curve])
    ax.set_xlabel("training sequences")
    ax.set_ylabel("accuracy on copied tokens")
    ax.set_title(f"induction plateau: {model.num_layers} layers, batch {args.batch}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "plateau.png"), dpi=120)
    print(f"wrote {args.out}/results.json and plateau.png")
    if args.save:
        from jaxkv.hf import save_hf
        from jaxkv.model import Model
        from jaxkv.tasks import build_tokenizer
        save_hf(Model(config=model, params=params, tokenizer=build_tokenizer()), args.save)
        print(f"exported the weights to {args.save}")


if __name__ == "__main__":
    main()
