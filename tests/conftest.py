"""Shared test fixtures. Reference checkpoints live in tests/fixtures (see its README);
a missing folder is an error, never a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from omni_model.tokenizers.text import ByteTokenizer
from omni_model.toy import toy_model, toy_vocab

# a failed or timed-out test names its slow step (tests/step_clock.py)
pytest_plugins = ["tests.step_clock"]

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def vocab(tokenizer):
    return toy_vocab(tokenizer)


@pytest.fixture
def tiny_model(vocab):
    """A randomly initialised two-block model over the toy vocab."""
    return toy_model(vocab, hidden=64, layers=2, heads=4, kv_heads=2, seed=1).eval()


@pytest.fixture(scope="session")
def any2any(tmp_path_factory):
    """(model folder, speech codec folder, tasks) of a tiny model that has memorised one
    example of every any-to-any task (tests/any2any.py): from the cache scripts/test.sh
    builds it into (`OMNI_TEST_CACHE`), else trained here once per session."""
    from tests.any2any import cached_any2any, train_any2any
    from tests.step_clock import step

    if os.environ.get("OMNI_TEST_CACHE"):
        with step("load the shared any-to-any model (trained when the cache lacks it)"):
            return cached_any2any(Path(os.environ["OMNI_TEST_CACHE"]))
    with step("train the shared any-to-any model (OMNI_TEST_CACHE is not set)"):
        return train_any2any(tmp_path_factory.mktemp("any2any"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, with more logical CPUs than cores so
    actor pools and trainers fit side by side (see README, "Installing: notes")."""
    from pipelines.ray_setup import RayConfig, start_ray, stop_ray
    from tests.step_clock import step

    with step("start the session's Ray"):
        owned = start_ray(RayConfig(num_cpus=8))
    yield
    stop_ray(owned)
