"""Decode-attention kernels against their XLA references, per cache type and context: time, bytes
of cache read, achieved bandwidth and its share of the device's copy bandwidth.

  python benchmarks/kernels.py                                # every cache type, contexts 4K..128K
  python benchmarks/kernels.py --contexts 4096 8192 --types dense sparse --budget 0.1
  python benchmarks/kernels.py --smoke                        # tiny shapes, seconds on a CPU
  python benchmarks/kernels.py --smoke --mode interpret       # the Pallas kernels, interpreted

One layer of a Llama-3-8B-shaped cache (--heads 32 --kv-heads 8 --head-dim 128, batch --batch,
--dtype) with random keys/values, full to `context` prompt tokens, built with the caches' own
builders at compression --budget:

  dense      DenseCache.from_prefill (no compression; the bandwidth yardstick)
  headsplit  HeadSplitCache.from_dense: round(budget * K) (>= 1) random full heads, the others
             StreamingLLM heads of --sink + --stream-window slots
  sparse     SparseCache.from_selection: budget * context tokens per head on average, a different
             random count per head (AdaKV-style), random tokens
  quantized  KIVI-(--kivi-bits) via jaxkv.policies.kivi.KIVI (size fixed by the bit width)
  mixed      MixedCache.from_allocation with RDKV(budget)'s layout (arena size, per-head capacity,
             4-bit K rows in groups of 32): a random V width per token from {2, 4, 8, 16}
             filling each head's share of the arena, the rest evicted

Each is attended through `cache.attend` (pallas_kernels.dispatch) traced twice: under
`kernel_mode_override(mode)` (mode: tpu / gpu on those backends, --mode to force, e.g. interpret)
and under "reference" (XLA). `kernel_used` says whether the traced function really holds a
Pallas kernel (a cache type without a kernel for the backend, or a shape / dtype its kernel
refuses, falls back to its reference). On a CUDA GPU every cache type has a Mosaic GPU kernel
(`pallas_kernels/*_decode_gpu.py`; 16-bit caches with head dim a multiple of 64, so keep --dtype
bfloat16 or float16): dense and head-split through the dense kernel, sparse through the segment
kernel plus the dense one over the decode tokens, quantized and mixed through the code-block
kernel plus the dense one over the whole zone (mixed: one launch per V width), each call's
partials merged by one XLA combine. Their XLA preprocessing (KIVI's K scales permuted into
sub-block order, the mixed arena cut into per-width field views) is part of the timed call but
not of "bytes read", so it lowers GB/s rather than raising the bytes. Time:
--inner calls chained inside one jit (each query depends on the previous output, so nothing is
hoisted and dispatch overhead is amortised), median of --repeats after a compiling warm-up,
divided by --inner. Bytes read: `cache.nbytes()` (every array of the cache: codes, scales,
indices, padding, all read by a decode step at full length). GB/s = bytes / time; the copy
bandwidth is measured in the same run as (read + write bytes) / time of a jitted `x + 1` over a
--copy-mb float32 buffer. On a CPU (no accelerator) only the reference is timed, plus the copy
bandwidth. Writes JSON and a PNG (GB/s vs context) to --out and prints the table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types as pytypes

import jax
import jax.numpy as jnp
import numpy as np

from common import timed  # benchmarks/common.py

CACHE_TYPES = ("dense", "headsplit", "sparse", "quantized", "mixed")
ACCELERATOR_MODES = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}


# ---- caches ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self):
        for name in ("batch", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads}, kv_heads={self.kv_heads}: heads must be a "
                             f"multiple of kv_heads")


def _dense(key, shape: Shape, context: int):
    from jaxkv.cache import DenseCache
    kk, kv = jax.random.split(key)
    dims = (shape.batch, shape.kv_heads, context, shape.head_dim)
    k = jax.random.normal(kk, dims, jnp.float32).astype(shape.dtype)  # [B, K, T, D]
    v = jax.random.normal(kv, dims, jnp.float32).astype(shape.dtype)
    lengths = jnp.full((shape.batch,), context, jnp.int32)
    return DenseCache.from_prefill(k, v, lengths, context)


def build_cache(kind: str, key, shape: Shape, context: int, args):
    """One layer's cache of `kind` over `context` random prompt tokens (see module docstring).
    The static choices (heads, counts, sizes) are drawn here; the arrays in one jitted call."""
    kh, d = shape.kv_heads, shape.head_dim
    rng = np.random.default_rng(context)
    if kind == "dense":
        make = lambda key, dense: dense
    elif kind == "headsplit":
        from jaxkv.cache.headsplit import HeadSplitCache
        n_full = int(min(kh, max(1, round(args.budget * kh))))
        full = tuple(sorted(rng.choice(kh, size=n_full, replace=False).tolist()))
        stream = tuple(h for h in range(kh) if h not in full)
        make = lambda key, dense: HeadSplitCache.from_dense(dense, full, stream, args.sink,
                                                            args.stream_window)
    elif kind == "sparse":
        from jaxkv.cache import SparseCache
        n = max(1, int(round(args.budget * context)))
        share = rng.dirichlet(np.ones(kh)) * 0.8 + 0.2 / kh  # head-wise budgets, sum = K * n
        counts = np.minimum(np.floor(share * kh * n).astype(int), context)
        counts[np.argmin(counts)] += min(kh * n - counts.sum(), context - counts.min())

        def make(key, dense):
            scores = jax.random.uniform(key, (shape.batch, kh, context))
            rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # random rank per head
            keep = rank < jnp.asarray(counts, jnp.int32)[None, :, None]  # [B, K, T]
            return SparseCache.from_selection(dense.k, dense.v, keep, int(counts.sum()), 0)
    elif kind == "quantized":
        from jaxkv.policies.kivi import KIVI
        policy = KIVI(bits=args.kivi_bits, residual=32, group_size=32)
        make = lambda key, dense: policy.compress_layer(
            0, dense, pytypes.SimpleNamespace(lengths=dense.lengths, extra_capacity=0))
    elif kind == "mixed":
        from jaxkv.cache import MixedCache
        from jaxkv.cache.mixed_format import GROUP, position_bytes, v_record_bytes
        from jaxkv.policies.rdkv import RDKV
        policy = RDKV(budget=args.budget, window=32)
        item = jnp.dtype(shape.dtype).itemsize
        arena, cap = policy.arena_sizes(context, 0, kh, d, item)
        widths = np.asarray([2, 4, 8, 16])
        pb = position_bytes(context)
        # every token also pays its 4-bit K row (D / 2 bytes) and its share of a group header
        cost = np.asarray([v_record_bytes(int(w), d, pb) + d // 2 + 4 * d // GROUP + 1
                           for w in widths])

        def make(key, dense):
            pick = jax.random.choice(key, 4, (shape.batch, kh, context),
                                     p=jnp.asarray([0.4, 0.3, 0.2, 0.1]))
            used = jnp.cumsum(jnp.asarray(cost)[pick], axis=-1)  # [B, K, T] bytes so far
            token_bits = jnp.where(used + 4 * 4 * d <= cap, jnp.asarray(widths)[pick], 0)
            channel_bits = jnp.full((shape.batch, kh, d), 4, jnp.int32)  # 4 bits a channel
            return MixedCache.from_allocation(dense.k, dense.v, dense.lengths, token_bits,
                                              channel_bits, window=policy.window,
                                              arena_bytes=arena, head_capacity=cap,
                                              extra_capacity=0)
    else:
        raise ValueError(f"cache type {kind!r}: choose from {', '.join(CACHE_TYPES)}")

    @jax.jit
    def build(key):
        k_data, k_choice = jax.random.split(key)
        return make(k_choice, _dense(k_data, shape, context))
    return build(key)


# ---- timing ----------------------------------------------------------------------------------
def attend_loop(mode: str, scale: float, inner: int):
    """A jitted function (q, cache) -> out running `inner` chained decode attentions traced under
    kernel mode `mode`."""
    from pallas_kernels.dispatch import kernel_mode_override

    def run(q, cache):
        def body(_, qc):  # q of the next call depends on this output: no hoisting, no CSE
            out = cache.attend(qc, scale)  # [B, H, D]
            return q + (out * 0).astype(q.dtype)
        with kernel_mode_override(mode):
            return jax.lax.fori_loop(0, inner, body, q)
    return jax.jit(run)


# How a Pallas kernel shows in a jaxpr: pallas_call (TPU kernels), core_map, mpmd_map (Mosaic GPU
# kernels built with `plgpu.kernel`, jax 0.10)
KERNEL_PRIMITIVES = ("pallas_call", "core_map", "mpmd_map")


def uses_kernel(fn, *args) -> bool:
    """Whether tracing `fn` produced a Pallas kernel (else the dispatcher fell back to XLA)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return any(name in text for name in KERNEL_PRIMITIVES)


def copy_bandwidth(megabytes: int, repeats: int) -> dict:
    """(read + write bytes) / time of a jitted x + 1 over a float32 buffer of `megabytes` MB."""
    n = max(1, megabytes * 2 ** 20 // 4)
    x = jnp.zeros((n,), jnp.float32)
    fn = jax.jit(lambda x: x + 1.0)
    t = timed(lambda: fn(x), repeats)
    moved = 2 * x.nbytes
    return dict(bytes=int(moved), seconds=t, GBps=moved / t / 1e9)


def bench_one(kind, context, shape, args, kmode, copy_gbps, key):
    cache = build_cache(kind, key, shape, context, args)
    q = jax.random.normal(jax.random.fold_in(key, 7), (shape.batch, shape.heads, shape.head_dim),
                          jnp.float32).astype(shape.dtype)  # [B, H, D]
    scale = shape.head_dim ** -0.5
    nbytes = int(cache.nbytes())
    dense_bytes = shape.batch * shape.kv_heads * context * 2 * shape.head_dim \
        * jnp.dtype(shape.dtype).itemsize
    row = dict(type=kind, context=context, budget=args.budget, bytes=nbytes, MB=nbytes / 1e6,
               bytes_fraction=nbytes / dense_bytes, mode=kmode, kernel_used=False,
               kernel_ms=None, kernel_GBps=None, kernel_pct_copy=None, speedup=None)
    ref = attend_loop("reference", scale, args.inner)
    t_ref = timed(lambda: ref(q, cache), args.repeats) / args.inner
    row.update(ref_ms=t_ref * 1e3, ref_GBps=nbytes / t_ref / 1e9,
               ref_pct_copy=100 * nbytes / t_ref / 1e9 / copy_gbps)
    if kmode != "reference":
        fn = attend_loop(kmode, scale, args.inner)
        row["kernel_used"] = uses_kernel(fn, q, cache)
        t = timed(lambda: fn(q, cache), args.repeats) / args.inner
        row.update(kernel_ms=t * 1e3, kernel_GBps=nbytes / t / 1e9,
                   kernel_pct_copy=100 * nbytes / t / 1e9 / copy_gbps, speedup=t_ref / t)
    return row


# ---- output ----------------------------------------------------------------------------------
def _fmt(x, spec):
    """format(x, spec), or a right-aligned "-" of the same width for None."""
    return format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)


def table(rows, copy_gbps: float) -> str:
    head = (f"{'kernel':>10} {'mode':>9} {'context':>8} {'ms':>9} {'MB read':>9} {'GB/s':>8} "
            f"{'% copy':>7} {'ref ms':>9} {'ref GB/s':>8} {'speedup':>7}")
    lines = [f"copy bandwidth {copy_gbps:.2f} GB/s", head]
    for r in rows:
        mode = r["mode"] if r["kernel_used"] else ("-" if r["kernel_ms"] is None else "ref")
        lines.append(f"{r['type']:>10} {mode:>9} {r['context']:>8} {_fmt(r['kernel_ms'], '9.3f')} "
                     f"{r['MB']:>9.2f} {_fmt(r['kernel_GBps'], '8.1f')} "
                     f"{_fmt(r['kernel_pct_copy'], '7.1f')} {r['ref_ms']:>9.3f} "
                     f"{r['ref_GBps']:>8.1f} {_fmt(r['speedup'], '7.2f')}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    for i, kind in enumerate(dict.fromkeys(r["type"] for r in rows)):
        sel = [r for r in rows if r["type"] == kind]
        ctx = [r["context"] for r in sel]
        color = f"C{i}"
        if any(r["kernel_GBps"] is not None for r in sel):
            ax.plot(ctx, [r["kernel_GBps"] for r in sel], "o-", color=color,
                    label=f"{kind} ({result['mode']})")
        ax.plot(ctx, [r["ref_GBps"] for r in sel], "x--", color=color, label=f"{kind} (XLA ref)")
    ax.axhline(result["copy"]["GBps"], color="k", lw=1, ls=":", label="copy bandwidth")
    ax.set_xscale("log", base=2)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("GB/s (cache bytes / time)")
    ax.set_title(f"decode attention on {result['device']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+",
                    default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--types", nargs="+", default=list(CACHE_TYPES), choices=CACHE_TYPES)
    ap.add_argument("--budget", type=float, default=0.2,
                    help="compression: fraction of the dense cache kept (headsplit, sparse, mixed)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--stream-window", type=int, default=256)
    ap.add_argument("--kivi-bits", type=int, default=2, choices=(2, 4))
    ap.add_argument("--mode", default="auto", choices=("auto", "tpu", "gpu", "interpret",
                                                        "reference"),
                    help="kernel mode timed against the reference (auto: tpu / gpu by backend, "
                         "none on CPU)")
    ap.add_argument("--inner", type=int, default=None,
                    help="chained calls per timing (default 20 on an accelerator, 1 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (2 on CPU)")
    ap.add_argument("--copy-mb", type=int, default=None,
                    help="copy-bandwidth buffer in MB (default 1024 on an accelerator, 64 on CPU)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run: context 256, 4 heads / 2 KV heads / head dim 64, float32")
    ap.add_argument("--out", default="runs/kernels.json", help="JSON path; the PNG goes beside it")
    args = ap.parse_args(argv)
    accelerator = jax.default_backend() in ACCELERATOR_MODES
    if args.smoke:
        args.contexts, args.heads, args.kv_heads, args.head_dim = [256], 4, 2, 64
        args.dtype, args.stream_window = "float32", 32
        args.inner = args.inner or 1
        args.repeats = args.repeats or 1
        args.copy_mb = args.copy_mb or 8
    args.inner = args.inner or (20 if accelerator else 1)
    args.repeats = args.repeats or (5 if accelerator else 2)
    args.copy_mb = args.copy_mb or (1024 if accelerator else 64)
    if not 0 < args.budget <= 1:
        raise ValueError(f"--budget={args.budget}: must be in (0, 1]")
    if min(args.contexts) < 64:
        raise ValueError(f"--contexts={args.contexts}: every context must be >= 64 (the "
                         f"quantised and mixed caches keep a 32-token window whole)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = jax.default_backend()
    kmode = args.mode if args.mode != "auto" else ACCELERATOR_MODES.get(backend, "reference")
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.dtype)
    copy = copy_bandwidth(args.copy_mb, args.repeats)
    key = jax.random.PRNGKey(0)
    rows = []
    for context in args.contexts:
        for kind in args.types:
            rows.append(bench_one(kind, context, shape, args, kmode, copy["GBps"],
                                  jax.random.fold_in(key, context)))
            print(f"{kind} {context}: ref {rows[-1]['ref_ms']:.3f} ms"
                  + ("" if rows[-1]["kernel_ms"] is None else
                     f", {kmode} {rows[-1]['kernel_ms']:.3f} ms"), flush=True)
    result = dict(device=jax.devices()[0].device_kind, platform=backend, mode=kmode,
                  args=vars(args), copy=copy, rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(result, png)
    result["png"] = png
    print(f"wrote {args.out} and {png}")
    print(f"decode attention, one layer, batch {args.batch}, H={args.heads} K={args.kv_heads} "
          f"D={args.head_dim} {args.dtype}, budget {args.budget}, on {result['device']} "
          f"({backend})")
    print(table(rows, copy["GBps"]))
    return result


if __name__ == "__main__":
    main()
