"""jaxkv.cache.quant: RTN quantisation at 2/4/8 bits, bit packing, the eps(b) table and its file."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxkv.cache import quant as q

SETTINGS = settings(max_examples=40, deadline=None)
CODE_BITS = st.sampled_from([2, 4, 8])


# ---- packing -------------------------------------------------------------------------------------
def test_pack_hand_worked():
    # 2 bits, first code lowest: 1 | 2 << 2 | 3 << 4 | 0 << 6 = 1 + 8 + 48 = 57; a fifth code 3
    # starts a new byte padded with zeros: 3.
    np.testing.assert_array_equal(q.pack(jnp.array([1, 2, 3, 0, 3], jnp.uint8), 2), [57, 3])
    # 4 bits: 0xA | 0x3 << 4 = 0x3A = 58; a third code 5 alone in the next byte.
    np.testing.assert_array_equal(q.pack(jnp.array([10, 3, 5], jnp.uint8), 4), [58, 5])
    np.testing.assert_array_equal(q.pack(jnp.array([200, 7], jnp.uint8), 8), [200, 7])
    np.testing.assert_array_equal(q.unpack(jnp.array([57, 3], jnp.uint8), 2, 5), [1, 2, 3, 0, 3])
    assert [q.packed_length(n, 2) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [q.packed_length(n, 4) for n in (1, 2, 3)] == [1, 1, 2]
    assert q.packed_length(7, 8) == 7


@SETTINGS
@given(bits=CODE_BITS, n=st.sampled_from([1, 3, 4, 5, 8, 13]), lead=st.sampled_from([(2, 3)]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_pack_unpack_round_trip(bits, n, lead, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=lead + (n,), dtype=np.uint8)
    packed = q.pack(codes, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == lead + (math.ceil(n * bits / 8),)
    back = q.unpack(packed, bits, n)
    assert back.dtype == jnp.uint8
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_under_jit(bits):
    n = 13  # odd: padded in every packed width
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=(2, 3, n), dtype=np.uint8)
    packed = jax.jit(q.pack, static_argnums=1)(codes, bits)
    back = jax.jit(q.unpack, static_argnums=(1, 2))(packed, bits, n)
    np.testing.assert_array_equal(back, codes)


# ---- quantise / dequantise -----------------------------------------------------------------------
def _check_rtn(x, bits, axis, res):
    x = np.asarray(x, np.float32)
    codes, scale, zp = (np.asarray(a) for a in res)
    assert codes.dtype == np.uint8 and scale.dtype == np.float16 and zp.dtype == np.float16
    kept = list(x.shape)
    kept[axis] = 1
    assert scale.shape == tuple(kept) and zp.shape == tuple(kept)
    assert codes.shape == x.shape and codes.max() <= 2 ** bits - 1
    s, z = scale.astype(np.float64), zp.astype(np.float64)
    assert np.all(s >= 0)
    assert np.all(z <= x.min(axis=axis, keepdims=True))          # zero-point rounded down
    deq = np.asarray(q.dequantize(*res), np.float64)
    # Round to nearest on a grid of step `scale` covering [min, max]: within scale / 2, plus
    # float32 rounding of the reconstruction z + code * s (a few ulps of its magnitude).
    slack = 4 * np.finfo(np.float32).eps * (np.abs(z) + (2 ** bits - 1) * s)
    err = np.abs(deq - x)
    assert np.all(err <= s / 2 + slack), float(np.max(err - s / 2 - slack))


@SETTINGS
# Two shapes (each new shape compiles once; the second has slices of length 1); values vary freely.
@given(bits=CODE_BITS, axis=st.sampled_from([-1, -2]), shape=st.sampled_from([(2, 33, 16),
                                                                             (3, 1, 5)]),
       log_mag=st.floats(-3, 3), offset=st.floats(-10, 10), seed=st.integers(0, 2 ** 31 - 1))
def test_quantize_error_within_half_a_step(bits, axis, shape, log_mag, offset, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10.0 ** log_mag + offset).astype(np.float32)
    _check_rtn(x, bits, axis, q.quantize(x, bits, axis))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_rows(bits):
    # Rows of float16 values (0 is zero padding) come back exactly, with scale 0.
    x = np.array([[0.0] * 5, [1.5] * 5, [-3.25] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]], np.float32)
    res = q.quantize(x, bits, axis=-1)
    np.testing.assert_array_equal(np.asarray(res.scale)[:3, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(q.dequantize(*res))[:3], x[:3])
    _check_rtn(x, bits, -1, res)
    # 0.1 is no float16: within float16 resolution (the scale absorbs the rounding of min).
    y = np.full((1, 7), 0.1, np.float32)
    res = q.quantize(y, bits, axis=-1)
    np.testing.assert_allclose(np.asarray(q.dequantize(*res)), y, rtol=1e-4)
    _check_rtn(y, bits, -1, res)


def test_quantize_under_jit_and_bf16():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 16, 8)),
                    jnp.bfloat16)                                             # [B, K, T, D]
    res = jax.jit(q.quantize, static_argnums=(1, 2))(x, 4, -2)                 # K: per channel
    assert res.scale.shape == (2, 3, 1, 8)
    _check_rtn(np.asarray(x.astype(jnp.float32)), 4, -2, res)


def test_where_mask_ignores_padding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10, 4)).astype(np.float32)              # [K, T, D]
    padded = np.concatenate([x, np.full((3, 6, 4), 1e3, np.float32)], axis=1)
    valid = np.arange(16)[None, :, None] < 10                           # [1, T, 1]
    a = q.quantize(x, 4, axis=-2)
    b = q.quantize(padded, 4, axis=-2, where=valid)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero_point, b.zero_point)
    np.testing.assert_array_equal(np.asarray(b.codes)[:, :10], a.codes)
    np.testing.assert_array_equal(np.asarray(b.codes)[:, 10:], 0)
    assert math.isclose(float(q.normalized_mse(padded, 4, -2, where=valid)),
                        float(q.normalized_mse(x, 4, -2)), rel_tol=1e-6)
    # A slice with no valid element: scale 0, zero-point 0.
    c = q.quantize(padded, 2, axis=-2, where=np.zeros((1, 16, 1), bool))
    np.testing.assert_array_equal(c.scale, 0)
    np.testing.assert_array_equal(c.zero_point, 0)


# ---- eps -----------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([32, 128]), axis=st.sampled_from([-1, -2]),
       sigma=st.floats(1e-2, 1e2), seed=st.integers(0, 2 ** 31 - 1))
def test_eps_drops_about_4x_per_bit_on_gaussian(n, axis, sigma, seed):
    # With a fine grid the rounding error is ~uniform on [-s/2, s/2], so eps ~ s^2 / 12 / var with
    # s = range / (2^b - 1): eps(2)/eps(4) ~ (15/3)^2 = 25 and eps(4)/eps(8) ~ (255/15)^2 = 289,
    # i.e. ~4x per bit. Measured on 32..256 Gaussian samples per slice: 24-28 and 264-302.
    x = (np.random.default_rng(seed).standard_normal((4, n, n)) * sigma).astype(np.float32)
    e2, e4, e8 = (float(q.normalized_mse(x, b, axis)) for b in (2, 4, 8))
    assert 1.0 > e2 > e4 > e8 > 0.0
    assert e2 < 0.5   # 3 levels over ~[-2.5 sigma, 2.5 sigma] vs Gaussian energy
    assert 0.75 * 25 < e2 / e4 < 1.5 * 25
    assert 0.75 * 289 < e4 / e8 < 1.5 * 289


def test_normalized_mse_ends_and_zeros():
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    assert float(q.normalized_mse(x, 0, -1)) == 1.0
    assert float(q.normalized_mse(x, 16, -1)) == 0.0
    assert float(q.normalized_mse(np.zeros((4, 4), np.float32), 2, -1)) == 0.0
    # By hand: row [0, 1, 2, 3] at 2 bits is exact (zp 0, scale 1); [0, 1] at 2 bits too.
    assert float(q.normalized_mse(np.array([[0.0, 1.0, 2.0, 3.0]]), 2, -1)) == 0.0
    # fake_quantize follows the same ends: 0 bits evicts, 16 keeps.
    np.testing.assert_array_equal(q.fake_quantize(x, 0, -1), 0.0)
    np.testing.assert_array_equal(q.fake_quantize(x, 16, -1), x)


def test_calibrate_eps():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 64, 16)).astype(np.float32)     # [K, T, D]
    values = rng.standard_normal((2, 64, 16)).astype(np.float32)
    eps = q.calibrate_eps(keys, values)
    assert set(eps) == {"k", "v"} and all(set(t) == {2, 4, 8} for t in eps.values())
    assert all(isinstance(e, float) for t in eps.values() for e in t.values())
    for b in (2, 4, 8):
        assert math.isclose(eps["k"][b], float(q.normalized_mse(keys, b, -2)), rel_tol=1e-6)
        assert math.isclose(eps["v"][b], float(q.normalized_mse(values, b, -1)), rel_tol=1e-6)
    assert eps["k"][2] > eps["k"][4] > eps["k"][8]
    # Several arrays (prompts of different length): errors and norms pooled before dividing.
    k2 = rng.standard_normal((2, 32, 16)).astype(np.float32) * 3.0
    pooled = q.calibrate_eps([keys, k2], [values, values])
    num = sum(float(np.sum((a - np.asarray(q.fake_quantize(a, 4, -2))) ** 2)) for a in (keys, k2))
    den = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in (keys, k2))
    assert math.isclose(pooled["k"][4], num / den, rel_tol=1e-4)
    assert math.isclose(pooled["v"][4], eps["v"][4], rel_tol=1e-6)


def test_save_load_eps(tmp_path):
    eps = {"k": {2: 0.149, 4: 0.0062, 8: 2.2e-5}, "v": {2: 0.313, 4: 0.0140, 8: 4.9e-5}}
    path = tmp_path / "eps.json"
    q.save_eps(path, eps, "llama-3.1-8b@abc123")
    assert os.listdir(tmp_path) == ["eps.json"]                   # the temporary file is gone
    doc = json.loads(path.read_text())
    assert doc["model_fingerprint"] == "llama-3.1-8b@abc123"
    assert q.load_eps(path, "llama-3.1-8b@abc123") == eps
    q.save_eps(str(path), {"k": {2: 0.5}, "v": {8: 0.25}}, "other")  # overwrite in place
    assert q.load_eps(str(path), "other") == {"k": {2: 0.5}, "v": {8: 0.25}}
    with pytest.raises(ValueError, match=r"eps\.json.*model_fingerprint='other'.*"
                                         r"model_fingerprint='llama-3\.1-8b@abc123'"):
        q.load_eps(path, "llama-3.1-8b@abc123")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        q.load_eps(tmp_path / "missing.json", "other")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*not a JSON"):
        q.load_eps(tmp_path / "bad.json", "other")
    with pytest.raises(ValueError, match=r"eps\['k'\]\[4\]=-1\.0: must be a finite number >= 0"):
        q.save_eps(path, {"k": {4: -1.0}, "v": {4: 0.1}}, "m")
    with pytest.raises(ValueError, match=r"eps\['v'\] bits=3"):
        q.save_eps(path, {"k": {4: 0.1}, "v": {3: 0.1}}, "m")
    with pytest.raises(ValueError, match=r"model_fingerprint='': must be a non-empty string"):
        q.save_eps(path, eps, "")
    with pytest.raises(ValueError, match=r"folder .* does not exist"):
        q.save_eps(tmp_path / "no" / "eps.json", eps, "m")


# ---- errors --------------------------------------------------------------------------------------
def test_errors():
    x = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"bits=3: bit width must be one of \{0, 2, 4, 8, 16\}"):
        q.quantize(x, 3, -1)
    with pytest.raises(ValueError, match=r"bits=3: bit width must be one of \{0, 2, 4, 8, 16\}"):
        q.normalized_mse(x, 3, -1)
    with pytest.raises(ValueError, match=r"bits=16: must be one of \{2, 4, 8\} here"):
        q.quantize(x, 16, -1)
    with pytest.raises(ValueError, match=r"bits=0: must be one of \{2, 4, 8\} here"):
        q.pack(np.zeros(4, np.uint8), 0)
    with pytest.raises(ValueError, match=r"bits=2\.0"):
        q.quantize(x, 2.0, -1)
    with pytest.raises(ValueError, match=r"axis=2: must be an integer in \[-2, 1\]"):
        q.quantize(x, 4, 2)
    with pytest.raises(ValueError, match=r"x\.dtype=int32: must be a floating dtype"):
        q.quantize(np.ones((2, 2), np.int32), 4, -1)
    with pytest.raises(ValueError, match=r"codes\.dtype=float32: must be an integer dtype"):
        q.pack(np.zeros(4, np.float32), 4)
    with pytest.raises(ValueError, match=r"n=9: 9 codes at 2 bits take 3 bytes, but "
                                         r"packed\.shape\[-1\]=2"):
        q.unpack(np.zeros(2, np.uint8), 2, 9)
    with pytest.raises(ValueError, match=r"packed\.dtype=int32: must be uint8"):
        q.unpack(np.zeros(2, np.int32), 4, 4)
