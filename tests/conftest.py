import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's cache (demo data, fetched metric weights)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ENTROPY_KERNELS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
