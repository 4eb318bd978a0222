import pytest

from musar_core.tiny import build_tiny_flux


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    """A tiny random FLUX.1-style diffusers folder, built once per test session."""
    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (starting Ray per test would dominate CI time)."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: 2 Ray Train workers plus room for Ray Data's read tasks.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve was never started
        pass
    ray.shutdown()
