"""The fast-path tests fake a CUDA machine by patching torch.cuda.is_available; the memory budget
then reads the card (memory._card), which here is an 80 GiB card with everything free unless a test
says otherwise."""

import pytest


@pytest.fixture(autouse=True)
def _fake_card(monkeypatch):
    import llamaft.model.fast.memory as mem

    monkeypatch.setattr(mem, "_card", lambda: (80 * 2**30, 80 * 2**30, 0))
