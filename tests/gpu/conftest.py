"""GPU tier: opt-in (``make test-gpu`` / ``pytest -m gpu``) and only meaningful on a CUDA device."""

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not torch.cuda.is_available():
        # Not a pass: the GPU tier is excluded from `make test`; selecting it without a GPU is an error.
        pytest.fail("GPU test selected but torch.cuda.is_available() is False", pytrace=False)
