import os
import random

import numpy as np
import pytest
import torch

import odenet_timm  # noqa: F401  (registers the models)


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``pytest -n auto``) the workers share the cores: each gets its share of
    intra-op threads, since OpenMP threads spinning on an oversubscribed core slow every test down several times."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so results do not depend on test order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='module')
def one_torch_thread():
    """One torch thread for a module's tests (many small forward/backward passes: on 2 shared cores one thread is
    several times faster), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
