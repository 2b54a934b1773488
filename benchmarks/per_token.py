"""Which step of a task's chain of thought fails? Teacher-forced accuracy of every target token.

Runs a model folder (an export of `python -m train pretrain`, or `jaxkv/assets/<name>`) on fresh
examples of each task setting and prints each target token of the first example with the fraction
of examples whose token at that place is predicted right (the target lengths of these tasks are
fixed per setting, so the places line up).

    python benchmarks/per_token.py --model benchmarks/checkpoints/tiny_keys \\
        --task var_chain n_vars=6 cot=backward --task niah_multikey length=80 n_keys=4 \\
        --task niah_multikey length=80 n_keys=4 key_len=1 quote=true \\
        --task variable_tracking length=80 n_hops=2

Writes `--out` (JSON) when given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _value(text: str):
    """A setting's value from the command line: int, float, true/false/none, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_task(words):
    """["niah_multikey", "length=80", "n_keys=4"] -> ("niah_multikey", {"length": 80, ...})."""
    name, settings = words[0], {}
    for w in words[1:]:
        if "=" not in w:
            raise ValueError(f"--task {' '.join(words)}: setting {w!r} is not key=value")
        key, value = w.split("=", 1)
        settings[key] = _value(value)
    return name, settings


def per_token_accuracy(model, task, n: int, seed: int):
    """[(target word of the first example, fraction right at that place)] over n examples."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxkv.model import Decoder
    from jaxkv.tasks import make_training_batch, sample_examples
    examples = sample_examples(task, n, seed)
    batch = make_training_batch(examples, task.max_len)
    logits = jax.jit(lambda p, t: Decoder(model.config).apply(
        {"params": p}, t, method=Decoder.forward))(model.params, jnp.asarray(batch["tokens"][:, :-1]))
    ok = np.asarray(logits.argmax(-1)) == batch["tokens"][:, 1:]
    return accuracy_by_place(ok, batch["loss_mask"], examples[0].target.split() + ["<eos>"])


def accuracy_by_place(ok, loss_mask, words):
    """[(word, fraction right)] for the target places of a batch: ok bool [B, T - 1] (prediction
    of token t + 1 right), loss_mask [B, T] (the `make_training_batch` convention), words the
    first example's target (the targets start at the same place in every row)."""
    import numpy as np
    start = int(np.argmax(loss_mask[0] > 0))
    return [(w, round(float(a), 3)) for w, a in zip(words, ok[:, start:start + len(words)].mean(0))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face-style model folder")
    p.add_argument("--task", nargs="+", action="append", required=True,
                   metavar="NAME [KEY=VALUE ...]", help="a task and its settings (repeatable)")
    p.add_argument("--n", type=int, default=64, help="examples per task")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n={args.n}: must be >= 1")

    from jaxkv.hf import load_hf
    from jaxkv.tasks import make_task
    model = load_hf(args.model)
    results = []
    for words in args.task:
        name, settings = parse_task(words)
        acc = per_token_accuracy(model, make_task(name, **settings), args.n, args.seed)
        results.append({"task": name, "settings": settings, "per_token": acc})
        print(name, settings, " ".join(f"{w}:{a:.2f}" for w, a in acc), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "n": args.n, "seed": args.seed, "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()
