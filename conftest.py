# Loads the case-file plugin also where the package is not installed (a GPU host with the repo
# on PYTHONPATH); installed, its entry point has the same name, so it is not loaded twice.
pytest_plugins = ["harness.pytest_plugin"]

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_reference_cache():
    """Each test computes its own reference results (harness.refcache is per process)."""
    from harness import refcache

    refcache.CACHE.clear()
    yield
    refcache.CACHE.clear()
