"""The mixed full + streaming prefill kernel (RLKV / DuoAttention gate training), run in interpret
mode on CPU against the jnp math of `jaxkv.model.gated._mixed_attention`.

Every run draws fresh inputs (the seed is printed on failure). Kernels run with poison=True: their
outputs start as NaN, so an element the kernel forgets to write fails the comparison. The cases
are a small covering set rather than a full product (interpret mode is slow): group sizes 1, 4, 7
and 8; head dims 64 and 128 each with float32 and bfloat16; lengths that are not multiples of
either block; with and without prompt_lengths (including a whole-prompt row); sink 0 and > 0;
window 1 and longer than the sequence. Positions are the contiguous arange(T) of every row, the
kernel's requirement, and the reference is given exactly those.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkv.model.decoder import Decoder
from jaxkv.model.gated import mixed_attention_fn
from pallas_kernels import dispatch
from pallas_kernels.mixed_prefill import (mixed_prefill_attention, mixed_prefill_attention_fn,
                                          mixed_prefill_attention_reference,
                                          mixed_prefill_branches)
from tests.helpers import assert_close, normal, random_params, tiny_config

pytestmark = pytest.mark.usefixtures("reset_tpu_interpreter")

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _inputs(rng, b, t, kv, group, dim, dt):
    q = normal(rng, (b, t, kv * group, dim), dt)  # [B, T, H, D]
    k = normal(rng, (b, t, kv, dim), dt)  # [B, T, K, D]
    v = normal(rng, (b, t, kv, dim), dt)
    alpha = jnp.asarray(rng.uniform(0.0, 1.0, kv), jnp.float32)  # [K]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # contiguous
    return alpha, q, k, v, positions


# (group G, kv heads K, head dim D, dtype, T, block_q, block_k, prompts, sink, window,
#  also check the two branch outputs on their own)
CASES = [
    (1, 2, 64, "f32", 37, 16, 16, False, 0, 1, True),    # window 1: streaming = the diagonal
    (4, 2, 128, "bf16", 45, 16, 32, True, 3, 64, False),  # window > T: streaming = causal
    (7, 1, 64, "bf16", 29, 32, 16, True, 0, 5, False),    # G = 7; T shorter than a query block
    (8, 1, 128, "f32", 50, 16, 16, True, 4, 9, True),     # tail blocks of 2 rows
]


@pytest.mark.parametrize("group,kv,dim,dtype,t,block_q,block_k,prompts,sink,window,branches",
                         CASES)
def test_kernel_matches_reference(rng, group, kv, dim, dtype, t, block_q, block_k, prompts,
                                  sink, window, branches):
    dt = DTYPES[dtype]
    alpha, q, k, v, positions = _inputs(rng, 2, t, kv, group, dim, dt)
    # Row 0: a prompt ending inside a block, past the first query block; row 1: all prompt.
    lengths = (jnp.asarray([int(rng.integers(block_q, t)) if t > block_q else t // 2, t],
                           jnp.int32) if prompts else None)
    msg = f"{rng.seed_msg} lengths={None if lengths is None else np.asarray(lengths)}"
    kernel = jax.jit(lambda a, q, k, v, n: mixed_prefill_attention(
        a, q, k, v, None, n, sink=sink, window=window, block_q=block_q, block_k=block_k,
        interpret=True, poison=True))
    out = kernel(alpha, q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = mixed_prefill_attention_reference(alpha, q, k, v, positions, lengths, sink,
                                                 window)
    assert_close(out, expected, dt, msg)
    if not branches:
        return
    # The branches themselves: alpha = 1 is the full branch, alpha = 0 the streaming one.
    full, stream = mixed_prefill_branches(q, k, v, lengths, sink=sink, window=window,
                                          block_q=block_q, block_k=block_k, interpret=True,
                                          poison=True)
    for a, got in ((1.0, full), (0.0, stream)):
        want = mixed_prefill_attention_reference(jnp.full((kv,), a), q, k, v, positions,
                                                 lengths, sink, window)
        assert_close(got.astype(dt), want, dt, f"{msg} alpha={a}")


def test_tpu_interpret_through_dispatcher(rng):
    """The dispatcher in "interpret" mode runs the kernel under the TPU interpreter (simulated
    scalar prefetch, VMEM scratch, DMAs; NaN-initialised memory) and agrees with the reference,
    which is what the "reference" mode returns."""
    alpha, q, k, v, positions = _inputs(rng, 2, 19, 2, 2, 64, jnp.float32)
    lengths = jnp.asarray([11, 0], jnp.int32)
    kw = dict(sink=2, window=5)
    with dispatch.kernel_mode_override("interpret"):
        out = dispatch.mixed_prefill_attention(alpha, q, k, v, positions, lengths, block_q=8,
                                               block_k=8, **kw)
    with dispatch.kernel_mode_override("reference"):
        expected = dispatch.mixed_prefill_attention(alpha, q, k, v, positions, lengths, **kw)
    assert_close(expected, mixed_prefill_attention_reference(alpha, q, k, v, positions, lengths,
                                                       **kw), jnp.float32, rng.seed_msg)
    assert_close(out, expected, jnp.float32, rng.seed_msg)


def test_gradients_match_reference(rng):
    """d loss / d (alpha, q, k, v) of the custom_vjp (alpha from the two branch outputs; q, k, v
    from the dq and dk/dv kernels) against jax.grad of the reference, float32."""
    alpha, q, k, v, positions = _inputs(rng, 2, 21, 2, 3, 64, jnp.float32)
    lengths = jnp.asarray([10, 0], jnp.int32)
    w = normal(rng, q.shape, jnp.float32)  # loss = sum(out * w): a random cotangent

    def loss_kernel(a, q, k, v):
        out = mixed_prefill_attention(a, q, k, v, None, lengths, sink=2, window=4, block_q=8,
                                      block_k=8, interpret=True, poison=True)
        return jnp.sum(out * w)

    def loss_reference(a, q, k, v):
        return jnp.sum(mixed_prefill_attention_reference(a, q, k, v, positions, lengths, 2, 4)
                       * w)

    got = jax.jit(jax.grad(loss_kernel, argnums=(0, 1, 2, 3)))(alpha, q, k, v)
    want = jax.grad(loss_reference, argnums=(0, 1, 2, 3))(alpha, q, k, v)
    for name, g, e in zip(("alpha", "q", "k", "v"), got, want):
        assert_close(g, e, jnp.float32, f"{rng.seed_msg} d{name}")


def test_model_gate_gradients_match_reference(rng):
    """Through a whole 2-layer model: the gradient w.r.t. layer 0's gates flows back through
    layer 1's attention into its q, k, v, so it is right only because the kernel differentiates
    those too. Logits and d loss / d gates match `mixed_attention_fn`'s."""
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    params = random_params(cfg, 0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 19)), jnp.int32)
    lengths = jnp.asarray([7, 12], jnp.int32)
    gates = jnp.asarray(rng.uniform(0.0, 1.0, (cfg.num_layers, cfg.num_kv_heads)), jnp.float32)
    w = normal(rng, (2, 19, cfg.vocab_size), jnp.float32)

    def loss(g, make_fn):
        logits = Decoder(cfg).apply({"params": params}, tokens, attention_fn=make_fn(g),
                                    method=Decoder.forward)
        return jnp.sum(logits.astype(jnp.float32) * w), logits

    kernel_fn = lambda g: mixed_prefill_attention_fn(g, 2, 3, lengths, interpret=True,
                                                     block_q=8, block_k=8)
    reference_fn = lambda g: mixed_attention_fn(g, 2, 3, lengths)
    (_, logits), d_gates = jax.jit(jax.value_and_grad(
        lambda g: loss(g, kernel_fn), has_aux=True))(gates)
    (_, logits_ref), d_ref = jax.value_and_grad(lambda g: loss(g, reference_fn),
                                                has_aux=True)(gates)
    assert_close(logits, logits_ref, jnp.float32, rng.seed_msg)
    assert float(jnp.abs(d_ref[0]).max()) > 0  # layer 0's gates matter
    assert_close(d_gates, d_ref, jnp.float32, rng.seed_msg)


def test_errors():
    alpha, q, k, v, positions = _inputs(np.random.default_rng(0), 1, 12, 2, 2, 64, jnp.float32)
    kw = dict(sink=0, window=4, interpret=True)
    with pytest.raises(ValueError, match="contiguous positions"):
        mixed_prefill_attention(alpha, q, k, v, positions + 1, None, **kw)
    with pytest.raises(ValueError, match="block_q=12"):
        mixed_prefill_attention(alpha, q, k, v, positions, None, block_q=12, **kw)
    with pytest.raises(ValueError, match="one gate per KV head"):
        mixed_prefill_attention(alpha[:1], q, k, v, positions, None, **kw)
    with pytest.raises(ValueError, match="window=0"):
        mixed_prefill_attention(alpha, q, k, v, positions, None, sink=0, window=0)
    with pytest.raises(ValueError, match="gates"):
        mixed_prefill_attention_fn(alpha, 0, 4)  # [K] instead of [L, K]
