"""The one-process reference run shared by the multi-process tests (DDP and FSDP compare against it)."""

import pytest

from distributed_helpers import _project
from llamaft.cli import main
from train_helpers import one_torch_thread


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """The reference: the same project trained in this process."""
    root = tmp_path_factory.mktemp("one")
    with one_torch_thread():
        assert main(["train", str(_project(root))]) == 0
    return root / "run"
