"""`python -m train calibrate`: the RDKV eps table of a model, stored per model fingerprint in the
user cache folder (the tests point it at a temporary one) and picked up by make_policy("rdkv")."""
import dataclasses
import json

import pytest

from jaxkv.hf import load_hf, save_hf
from jaxkv.policies.rdkv import DEFAULT_EPS, EPS_FILE, RDKV, load_calibration
from jaxkv.policies.registry import make_policy
from jaxkv.tasks import VOCAB_SIZE, build_tokenizer
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model"))
    model = dataclasses.replace(tiny_model(vocab_size=VOCAB_SIZE, max_position_embeddings=512),
                                tokenizer=build_tokenizer())
    save_hf(model, path)
    return path


def test_cli_writes_the_table_to_the_user_cache_and_rdkv_uses_it(model_dir):
    from train.__main__ import main
    assert main(["calibrate", "--model", model_dir, "--n", "1"]) == 0
    import os

    from jaxkv.paths import user_cache_dir
    from jaxkv.policies.rdkv import eps_cache_path
    model = load_hf(model_dir)
    path = eps_cache_path(model)
    assert path.startswith(user_cache_dir()) and not os.path.exists(f"{model_dir}/{EPS_FILE}")
    eps = load_calibration(path, model)
    for name in ("k", "v"):
        e = [eps[name][b] for b in (2, 4, 8)]
        assert 1.0 > e[0] > e[1] > e[2] > 0.0  # coarser codes, more distortion
    policy = make_policy("rdkv", 0.2, model, window=4)
    assert policy.eps_table == {n: {b: pytest.approx(e) for b, e in t.items()} for n, t in eps.items()}
    assert policy.eps_table != {n: dict(t) for n, t in DEFAULT_EPS.items()}


def test_prompts_file(model_dir, tmp_path):
    from train.calibrate import run_calibration
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "SUM i0 3 i1 4 ?"}) + "\n\n"
                    + json.dumps({"prompt": "Q PASS ?"}) + "\n")
    out = str(tmp_path / "eps.json")
    eps = run_calibration(model_dir, out, prompts_file=str(good))
    assert set(eps) == {"k", "v"} and isinstance(RDKV(eps=eps), RDKV)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        run_calibration(model_dir, out, prompts_file=str(bad))
