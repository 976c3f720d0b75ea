import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when pytest runs alongside DataLoader workers.
torch.set_num_threads(min(2, os.cpu_count() or 1))

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
