import random

import numpy as np
import pytest
import torch

import odenet_timm  # noqa: F401  (registers the models)


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
