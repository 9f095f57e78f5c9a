import os

import pytest
import torch

# The suite must run on 2 CPU cores in minutes: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
