"""Fixtures shared by the kernel tests."""
import numpy as np
import pytest

from tests.helpers import SeededRng


@pytest.fixture(autouse=True, scope="session")
def _user_cache_dir(tmp_path_factory):
    """Per-user files (RDKV calibration tables) go to a fresh folder: tests neither read nor
    write the real user cache."""
    import os
    folder = str(tmp_path_factory.mktemp("jaxkv-cache"))
    previous = os.environ.get("JAXKV_CACHE_DIR")
    os.environ["JAXKV_CACHE_DIR"] = folder
    yield folder
    if previous is None:
        os.environ.pop("JAXKV_CACHE_DIR", None)
    else:
        os.environ["JAXKV_CACHE_DIR"] = previous


@pytest.fixture
def rng():
    """A SeededRng with a new seed every run (fresh inputs; the seed is in rng.seed_msg)."""
    return SeededRng(np.random.SeedSequence().entropy)


@pytest.fixture
def reset_tpu_interpreter():
    """For modules running TPU interpret mode (`pytest.mark.usefixtures`): the interpreter's state
    must be reset after a kernel raised in it."""
    yield
    from jax.experimental.pallas import tpu as pltpu
    pltpu.reset_tpu_interpret_mode_state()
