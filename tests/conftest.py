from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two threads match the target machine and keep CPU timing noise low between tests.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_model  # imported here: transformers is slow to import

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
