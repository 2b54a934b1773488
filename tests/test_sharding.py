"""jaxkv.sharding: partition specs by parameter name, and a (2, 2) data x model mesh on 4 fake
CPU devices giving the single-device logits and greedy tokens.

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax is imported, so the
mesh checks run in a subprocess; the spec rules are checked here against an AbstractMesh.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxkv import sharding
from jaxkv.cache.dense import DenseCache
from jaxkv.model.decoder import init_params
try:  # tests/ as a package (tests/__init__.py) or as a plain folder on sys.path
    from tests.helpers import tiny_config
except ImportError:  # pragma: no cover
    from helpers import tiny_config

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _abstract_params(**changes):
    return jax.eval_shape(lambda: init_params(tiny_config(**changes)))


def test_param_specs_by_name():
    specs = sharding.param_specs(_abstract_params(), AbstractMesh((2, 2), sharding.AXES))
    attn, mlp = specs["layers_0"]["self_attn"], specs["layers_1"]["mlp"]
    for name in ("q_proj", "k_proj", "v_proj"):  # [E, N*D]: heads split
        assert attn[name]["kernel"] == P(None, "model"), name
    assert attn["o_proj"]["kernel"] == P("model", None)  # [H*D, E]
    assert mlp["gate_proj"]["kernel"] == P(None, "model")
    assert mlp["up_proj"]["kernel"] == P(None, "model")
    assert mlp["down_proj"]["kernel"] == P("model", None)
    assert specs["embed_tokens"]["embedding"] == P("model", None)  # [V, E]: vocab split
    assert specs["lm_head"]["kernel"] == P(None, "model")  # [E, V]
    assert specs["norm"]["weight"] == P()
    assert specs["layers_0"]["input_layernorm"]["weight"] == P()


def test_param_specs_bias_and_qk_norm():
    params = _abstract_params(attention_bias=True, qk_norm=True, tie_word_embeddings=True)
    specs = sharding.param_specs(params, AbstractMesh((1, 2), sharding.AXES))
    attn = specs["layers_0"]["self_attn"]
    assert attn["q_proj"]["bias"] == P("model") and attn["k_proj"]["bias"] == P("model")
    assert attn["q_norm"]["weight"] == P()  # [D]: replicated
    assert "lm_head" not in specs


def test_param_specs_replicate_what_does_not_divide():
    # model axis 3: E=64, H*D=64, K*D=16 and V=128 are not multiples of 3, F=96 is.
    specs = sharding.param_specs(_abstract_params(), AbstractMesh((1, 3), sharding.AXES))
    assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == P()
    assert specs["layers_0"]["self_attn"]["o_proj"]["kernel"] == P()
    assert specs["embed_tokens"]["embedding"] == P()
    assert specs["layers_0"]["mlp"]["gate_proj"]["kernel"] == P(None, "model")
    assert specs["layers_0"]["mlp"]["down_proj"]["kernel"] == P("model", None)


def test_batch_and_cache_specs():
    mesh = AbstractMesh((2, 2), sharding.AXES)
    assert sharding.batch_spec((4, 64), mesh) == P("data", None)
    assert sharding.batch_spec((3, 64), mesh) == P()  # 3 rows do not split over 2
    assert sharding.batch_spec((), mesh) == P()
    cache = DenseCache.from_prefill(jnp.zeros((2, 2, 5, 8)), jnp.zeros((2, 2, 5, 8)),
                                    jnp.array([5, 3]), capacity=9)
    specs = sharding.cache_specs(cache, mesh)
    assert specs.k == P("data", "model", None, None)  # [B, K, S, D]
    assert specs.v == P("data", "model", None, None)
    assert specs.lengths == P("data")
    wide = sharding.cache_specs(cache, AbstractMesh((2, 4), sharding.AXES))
    assert wide.k == P("data", None, None, None)  # 2 KV heads do not split over 4


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"data=0: must be a positive integer"):
        sharding.make_mesh(0, 1)
    with pytest.raises(ValueError, match=r"model=99 needs 99 devices"):
        sharding.make_mesh(1, 99)


CHILD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    import jaxkv
    from jaxkv import sharding
    from tests.helpers import tiny_model

    assert len(jax.devices()) == 4, jax.devices()
    model = tiny_model(seed=1)
    mesh = sharding.make_mesh(data=2, model=2)
    sharded = sharding.shard_model(model, mesh)
    q = sharded.params["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [E=64, H*D=64]
    o = sharded.params["layers_0"]["self_attn"]["o_proj"]["kernel"]

    tokens = np.random.RandomState(0).randint(0, 128, (2, 24))
    single = np.asarray(jaxkv.forward(model, tokens))
    logits = jaxkv.forward(sharded, sharding.shard_batch(jnp.asarray(tokens), mesh))

    prompts = [[5, 17, 99], [42, 7, 7, 64, 3, 120, 11]]
    want = jaxkv.generate(model, prompts, max_new_tokens=16, eos_ids=()).tokens
    got = jaxkv.generate(sharded, prompts, max_new_tokens=16, eos_ids=(), mesh=mesh).tokens
    print(json.dumps(dict(
        q_spec=list(q.sharding.spec),
        q_shard_shape=list(q.addressable_shards[0].data.shape),
        q_devices=len(q.sharding.device_set),
        o_spec=list(o.sharding.spec),
        logits_spec=list(logits.sharding.spec),
        max_diff=float(np.abs(np.asarray(logits) - single).max()),
        allclose=bool(np.allclose(np.asarray(logits), single, atol=1e-5, rtol=1e-5)),
        want=want, got=got)))
""")


def test_mesh_2x2_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["q_spec"] == [None, "model"]
    assert result["q_shard_shape"] == [64, 32]  # columns split over the 2-way model axis
    assert result["q_devices"] == 4
    assert result["o_spec"] == ["model", None]
    assert result["logits_spec"][0] == "data"  # batch stayed on the data axis
    assert result["allclose"], result["max_diff"]
    assert result["got"] == result["want"]
    assert all(len(t) == 16 for t in result["got"])
