"""The one-process reference run shared by the multi-process tests (DDP and FSDP compare against it)."""

import pytest

from distributed_helpers import _project
from llamaft.cli import main


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """The reference: the same project trained in this process."""
    import torch

    root = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(_project(root))]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"
