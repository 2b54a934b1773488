"""Fixtures shared by the kernel tests."""
import numpy as np
import pytest

from tests.helpers import SeededRng


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
