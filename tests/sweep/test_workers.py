"""Which GPUs each worker gets: one each, or a group of sweep.gpus_per_trial; what does not fit is one line."""

import pytest

from llamaft.errors import ConfigError
from llamaft.sweep.workers import plan_workers
from llamaft.train import launch


@pytest.fixture
def gpus(monkeypatch):
    def visible(n: int, ids: str | None = None):
        monkeypatch.setattr(launch, "visible_gpus", lambda: n)
        if ids is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ids)
    return visible


def test_one_gpu_per_worker_or_a_group_each(gpus):
    gpus(4)
    assert plan_workers("auto") == ["0", "1", "2", "3"]
    assert plan_workers("auto", 2) == ["0,1", "2,3"]
    assert plan_workers(1, 2) == ["0,1"]
    assert plan_workers(1, 3) == ["0,1,2"]  # a count of workers given: GPUs may stay idle
    assert plan_workers("auto", 4) == ["0,1,2,3"]
    gpus(4, "4,5,6,7")  # the GPUs this process may use
    assert plan_workers("auto", 2) == ["4,5", "6,7"]
    gpus(0)  # CPU: workers leave the environment alone; a trial's processes use gloo
    assert plan_workers("auto", 2) == [None] and plan_workers(2, 2) == [None, None]


@pytest.mark.parametrize("n, workers, per_trial, message", [
    (4, "auto", 3, "sweep.gpus_per_trial: 3 does not divide the 4 GPUs visible (1 would stay idle); set sweep.workers: 1, "
                   "or CUDA_VISIBLE_DEVICES"),
    (2, "auto", 4, "sweep.gpus_per_trial: 4 GPUs per trial, but 2 GPUs visible"),
    (4, 3, 2, "sweep.workers: 3 workers x 2 GPUs per trial, but 4 GPUs visible"),
    (1, 2, 1, "sweep.workers: 2 workers x 1 GPU per trial, but 1 GPU visible"),
])
def test_groups_that_do_not_fit_are_one_line(gpus, n, workers, per_trial, message):
    gpus(n)
    with pytest.raises(ConfigError) as err:
        plan_workers(workers, per_trial)
    assert str(err.value) == message
