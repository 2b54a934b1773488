"""Bad and edge inputs to the public API: each is refused with a ValueError naming the argument,
or does what a reference computes; nothing is silently wrong (the hardening issue's list)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxkv
from jaxkv.generate import rng_key
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def reference_greedy(model, prompt, n):
    """Greedy decoding by repeated full forward passes (no cache): what generate must match."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = np.asarray(jaxkv.forward(model, [ids]))[0, -1]
        nxt = int(np.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
    return out


# ---- prompts --------------------------------------------------------------------------------

def test_a_2d_array_or_jax_array_is_a_batch_of_prompts(model):
    batch = np.array([[1, 5, 6], [1, 7, 8]])
    want = [reference_greedy(model, row, 3) for row in batch]
    for prompts in (batch, jnp.asarray(batch), batch.astype(np.int16), [row for row in batch]):
        assert jaxkv.generate(model, prompts, 3, eos_ids=()).tokens == want
    assert jaxkv.generate(model, np.array([1, 5, 6]), 3, eos_ids=()).tokens == want[:1]


def test_numpy_integers_in_a_list_are_one_prompt(model):
    got = jaxkv.generate(model, [np.int64(1), 5, 6], 3, eos_ids=())
    assert got.prompt_lengths == [3] and got.tokens == [reference_greedy(model, [1, 5, 6], 3)]


@pytest.mark.parametrize("bad", [[[1, 5.7, 6]], [[1, True, 6]], [np.array([1.0, 5.0])],
                                 np.zeros((1, 2, 3), int), [[1, "a"]]])
def test_non_integer_token_ids_are_refused(model, bad):
    with pytest.raises(ValueError, match="prompts"):
        jaxkv.generate(model, bad, 2)


# ---- sampling settings ----------------------------------------------------------------------

@pytest.mark.parametrize("name, value", [("temperature", float("nan")), ("temperature", np.inf),
                                         ("top_p", float("nan")), ("temperature", "0.5")])
def test_non_finite_sampling_settings_are_refused(model, name, value):
    with pytest.raises(ValueError, match=f"{name}="):
        jaxkv.generate(model, [[1, 5, 6]], 2, **{name: value})


def test_nan_weights_raise_instead_of_returning_token_zero(model):
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    params["norm"]["weight"] = params["norm"]["weight"].at[0].set(jnp.nan)
    broken = jaxkv.Model(config=model.config, params=params)
    with pytest.raises(ValueError, match="non-finite logits"):
        jaxkv.generate(broken, [[1, 5, 6]], 3)


def test_seeds_do_not_alias():
    keys = {tuple(np.asarray(rng_key(s)).tolist())
            for s in (0, 1, 2 ** 32, 2 ** 32 + 1, -1, 2 ** 63 - 1, 2 ** 64, -(2 ** 32))}
    assert len(keys) == 8
    assert np.array_equal(rng_key(7), jax.random.PRNGKey(7))  # small seeds as before
    assert np.array_equal(rng_key(np.int64(7)), jax.random.PRNGKey(7))
    assert np.array_equal(rng_key(jax.random.key(3)), jax.random.key_data(jax.random.key(3)))
    for bad in ("abc", 1.5, True, None):
        with pytest.raises(ValueError, match="seed="):
            rng_key(bad)


def test_sampling_with_big_and_negative_seeds_differs_from_small_ones(model):
    run = lambda seed: jaxkv.generate(model, [[1, 5, 6]], 12, temperature=1.5, seed=seed,
                                      eos_ids=()).tokens
    assert run(2 ** 32) != run(0) or run(2 ** 32 + 5) != run(5)
    with pytest.raises(ValueError, match="seed='abc'"):
        run("abc")


def test_numpy_scalars_are_accepted(model):
    assert len(jaxkv.generate(model, [[1, 5, 6]], np.int64(2), eos_ids=()).tokens[0]) == 2
    assert jaxkv.make_policy("snapkv", np.float32(0.5), model, window=2) is not None
    with pytest.raises(ValueError, match="max_new_tokens=True"):
        jaxkv.generate(model, [[1, 5, 6]], True)


def test_make_policy_without_a_model(model):
    with pytest.raises(ValueError, match="model=None"):
        jaxkv.make_policy("snapkv", 0.5, None)


# ---- budgets: met or refused ----------------------------------------------------------------

def test_head_split_and_streaming_refuse_a_budget_they_cannot_meet(model):
    prompt = [list(range(3, 33))]  # 30 tokens
    gates = np.linspace(0.1, 0.9, 4).reshape(2, 2)
    with pytest.raises(ValueError, match="budget=0.05: even with every head streaming"):
        jaxkv.generate(model, prompt, 2, policy=jaxkv.make_policy("rlkv", 0.05, model,
                                                                   gates=gates))
    with pytest.raises(ValueError, match="cannot hold sink=64"):
        jaxkv.generate(model, prompt, 2, policy=jaxkv.make_policy("streaming", 0.01, model,
                                                                   sink=64))
    ok = jaxkv.generate(model, prompt, 2, policy=jaxkv.make_policy("rlkv", 0.8, model,
                                                                    gates=gates, sink=2, window=4))
    assert ok.budget <= 0.8 + 1e-9


# ---- files and configs ----------------------------------------------------------------------

def test_truncated_results_file_names_its_path(tmp_path):
    from jaxkv.eval import load_results
    (tmp_path / "results.json").write_text('[{"task": "passkey", "met')
    with pytest.raises(ValueError, match="results.json: not a readable results file"):
        load_results(tmp_path)


def test_config_module_of_the_wrong_type(tmp_path):
    from train.evaluate import build_config
    path = tmp_path / "cfg.py"
    path.write_text("CONFIG = {'methods': ('full',)}\n")
    with pytest.raises(ValueError, match="CONFIG is a dict, expected a jaxkv.eval.config.EvalConfig"):
        build_config(str(path), str(tmp_path / "out"))


def test_rdkv_table_is_tied_to_the_weights_not_the_dtype(tmp_path):
    from jaxkv.policies.rdkv import calibrate_model, load_calibration, save_calibration
    model = jaxkv.load("tiny")
    half = jaxkv.load("tiny", dtype="bfloat16")
    assert model.fingerprint == half.fingerprint
    prompts = [[1] + list(range(5, 45))]
    save_calibration(model, prompts, tmp_path / "eps.json")
    table = load_calibration(tmp_path / "eps.json", half)  # the bfloat16 load takes the table
    assert table == {n: {b: pytest.approx(e) for b, e in t.items()}
                     for n, t in calibrate_model(model, prompts).items()}
    other = jaxkv.Model(config=model.config, params=jax.tree_util.tree_map(lambda x: x * 1.01,
                                                                           model.params))
    with pytest.raises(ValueError, match="calibrated for model_fingerprint"):
        load_calibration(tmp_path / "eps.json", other)


# ---- property-based: generate and make_policy on random inputs ------------------------------

_prompt = st.lists(st.integers(0, 127), min_size=1, max_size=9)
_container = st.sampled_from(["list", "tuple", "np32", "np64", "np16", "jax", "str"])


def _as(kind, ids):
    if kind == "tuple":
        return tuple(ids)
    if kind in ("np32", "np64", "np16"):
        return np.asarray(ids, {"np32": np.int32, "np64": np.int64, "np16": np.int16}[kind])
    if kind == "jax":
        return jnp.asarray(ids, jnp.int32)
    return list(ids)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.tuples(_container, _prompt), min_size=1, max_size=3),
       n=st.one_of(st.integers(-1, 3), st.sampled_from([0.5, "2", None])),
       temperature=st.sampled_from([0.0, 0.0, -1.0, float("nan")]))
def test_generate_matches_the_reference_or_refuses(model, prompts, n, temperature):
    items = [(kind, ids) for kind, ids in prompts]
    batch = [_as(kind, ids) if kind != "str" else " ".join(map(str, ids)) for kind, ids in items]
    valid_n = isinstance(n, int) and n >= 1
    has_text = any(kind == "str" for kind, _ in items)  # the tiny random model has no tokenizer
    try:
        out = jaxkv.generate(model, batch, n, temperature=temperature, eos_ids=())
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert not (valid_n and temperature == 0.0 and not has_text), msg
        assert any(word in msg for word in ("max_new_tokens", "temperature", "prompts",
                                            "tokenizer")), msg
        return
    assert valid_n and temperature == 0.0 and not has_text
    assert out.tokens == [reference_greedy(model, ids, n) for _, ids in items]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["snapkv", "streaming", "kivi2", "h2o", "full", "nope"]),
       budget=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0, 1, True, "0.5", float("nan"),
                                                                  np.float32(0.3)])),
       window=st.one_of(st.integers(-2, 3), st.none()))
def test_make_policy_builds_or_refuses_by_name(model, method, budget, window):
    settings_ = {} if window is None or method in ("full", "streaming") else {"window": window}
    try:
        jaxkv.make_policy(method, budget, model, **settings_)
    except (ValueError, TypeError) as e:
        assert any(word in str(e) for word in ("method", "budget", "window")), str(e)
        return
    assert method != "nope"
    assert not isinstance(budget, (bool, str)) and 0 < float(budget) <= 1
