"""alignkit.runtime.fit_cpu_threads: ranks sharing one CPU machine split its physical cores, and a run on a machine
others keep busy uses fewer threads."""

import os

import pytest
import torch

from alignkit import runtime


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_ranks_on_one_machine_split_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launchers' fallback, not a choice
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(runtime, "physical_cores", lambda: 8)
    assert runtime.fit_cpu_threads() == 4 == torch.get_num_threads()


def test_a_busy_machine_gets_fewer_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "physical_cores", lambda: 8)
    torch.set_num_threads(8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # this process + 5 others
    assert runtime.fit_cpu_threads() == 3 == torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 30.0, 30.0))
    assert runtime.fit_cpu_threads() == 1
    torch.set_num_threads(8)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only this process: keep torch's count
    assert runtime.fit_cpu_threads() is None and torch.get_num_threads() == 8


def test_a_users_thread_count_is_kept(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 30.0, 30.0))
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.fit_cpu_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert runtime.fit_cpu_threads() is None and torch.get_num_threads() == threads
