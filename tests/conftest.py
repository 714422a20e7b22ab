"""Test-wide setup: 8 simulated CPU devices (set before jax is imported) and the shared-data fixture."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """The real GLUE / WebNLG folder beside the checkout; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (present in CI; see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture
def fixtures() -> pathlib.Path:
    """Small hand-written data files committed under tests/fixtures."""
    return FIXTURES
