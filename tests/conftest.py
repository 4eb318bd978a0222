import pytest

from musar_core.tiny import build_tiny_flux


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """A tiny random FLUX.1-style diffusers folder, built once per test session."""
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)
