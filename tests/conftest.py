import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist the workers share the cores: each gets its share of torch's threads, as threads spinning
    against another worker's cost more than they bring (most tests here are bound by Python, not arithmetic)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """The slow tests on real models first: workers take tests in this order, so the long ones start at once
    and the many short ones fill in around them (in collection order they came last, on one worker)."""
    items.sort(key=lambda item: item.get_closest_marker("real") is None)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Calibrations measured on test models go to a throwaway folder, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()
