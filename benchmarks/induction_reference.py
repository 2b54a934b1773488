"""Reference for `induction_plateau.py`: a minimal 2-layer attention-only transformer (RMSNorm,
RoPE or learned positions, no MLP, tied embeddings, every weight normal(0.02)) on the same dense
induction rows, with the same AdamW settings; `--init lecun` and `--mlp` move it one step
towards the embedded architecture each. It shows whether a plateau is the task's or the
embedded architecture's (issue 2: key matching).

    python benchmarks/induction_reference.py --batch 32  --steps 2000
    python benchmarks/induction_reference.py --batch 256 --steps 600

Prints the loss and the accuracy on the copied words every 100 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from induction_plateau import induction_rows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rope", type=int, default=1, help="1: RoPE; 0: learned absolute positions")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--init", choices=("normal", "lecun"), default="normal",
                   help="projection init: normal(0.02), or lecun_normal (the embedded model's "
                        "Flax default, std 1/sqrt(fan_in))")
    p.add_argument("--mlp", action="store_true",
                   help="add a SwiGLU MLP (3x width) to each block, as the embedded model has")
    a = p.parse_args(argv)
    if min(a.steps, a.batch, a.width, a.seq_len) < 1:
        raise ValueError(f"--steps={a.steps}, --batch={a.batch}, --width={a.width}, "
                         f"--seq-len={a.seq_len}: all must be >= 1")
    vocab, d, n_heads, n_layers, seq = 256, a.width, 4, 2, a.seq_len
    hd = d // n_heads

    def w(key, shape):
        std = 0.02 if a.init == "normal" else shape[0] ** -0.5
        return jax.random.normal(key, shape) * std

    k = jax.random.split(jax.random.PRNGKey(0), 20)
    params = {"emb": jax.random.normal(k[0], (vocab, d)) * 0.02,
              "pos": jax.random.normal(k[1], (seq, d)) * 0.02,
              "layers": [{n: w(k[2 + 4 * l + i], (d, d)) for i, n in enumerate("qkvo")}
                         for l in range(n_layers)]}
    if a.mlp:
        km = jax.random.split(jax.random.PRNGKey(1), 3 * n_layers)
        for l, lp in enumerate(params["layers"]):
            lp.update(gate=w(km[3 * l], (d, 3 * d)), up=w(km[3 * l + 1], (d, 3 * d)),
                      down=w(km[3 * l + 2], (3 * d, d)))
    inv = 1.0 / (10000 ** (np.arange(0, hd, 2) / hd))

    def rope(x):  # [B, T, H, hd]
        ang = np.arange(x.shape[1])[:, None] * inv[None]
        c, s = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def rms(x):
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    def forward(params, t):
        x = params["emb"][t] + (0 if a.rope else params["pos"][None, : t.shape[1]])
        b, n = t.shape
        mask = np.tril(np.ones((n, n), bool))
        for lp in params["layers"]:
            h = rms(x)
            q, kk, v = [(h @ lp[name]).reshape(b, n, n_heads, hd) for name in "qkv"]
            if a.rope:
                q, kk = rope(q), rope(kk)
            s = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(hd), -1e9)
            o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, n, d)
            x = x + o @ lp["o"]
            if a.mlp:
                h = rms(x)
                x = x + (jax.nn.silu(h @ lp["gate"]) * (h @ lp["up"])) @ lp["down"]
        return rms(x) @ params["emb"].T

    def loss(params, t, m):
        logits = forward(params, t[:, :-1])
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:])
        mm = m[:, :-1]
        return ((xent * mm).sum() / mm.sum(),
                ((logits.argmax(-1) == t[:, 1:]) * mm).sum() / mm.sum())

    warmup = min(30, max(a.steps - 1, 1))  # 30 in every run the README reports
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, warmup, max(a.steps, 2),
                                                         a.lr * 0.1),
                      b1=0.9, b2=0.98, weight_decay=0.01)
    state = opt.init(params)

    @jax.jit
    def step(params, state, t, m):
        (value, acc), g = jax.value_and_grad(loss, has_aux=True)(params, t, m)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, value, acc

    t0 = time.time()
    for s in range(a.steps):
        t, m = induction_rows(np.random.default_rng([3, s]), a.batch, seq)
        params, state, value, acc = step(params, state, jnp.asarray(t), jnp.asarray(m))
        if (s + 1) % 100 == 0 or s + 1 == a.steps:
            print(json.dumps({"step": s + 1, "sequences": (s + 1) * a.batch,
                              "loss": round(float(value), 3), "copy_acc": round(float(acc), 3),
                              "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
