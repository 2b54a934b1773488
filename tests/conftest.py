"""Fixtures shared by the kernel tests."""
import os

# The CLI turns on JAX's persistent compilation cache; tests call the CLI in-process, and writing
# some executables (interpret-mode Pallas kernels, host callbacks) to that cache crashes the
# interpreter (SIGSEGV in compilation_cache.put_executable_and_time). Tests compile fresh.
os.environ["JAXKV_NO_COMPILATION_CACHE"] = "1"

import numpy as np  # noqa: E402
import pytest

from tests.helpers import SeededRng  # noqa: E402


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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Compiled programs of a test module are dropped when it ends: one process runs the whole
    suite, and executables of every earlier module would otherwise stay resident."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


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
