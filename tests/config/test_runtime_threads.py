"""alignkit.runtime.fit_threads_to_ranks: ranks sharing one CPU machine split its physical cores."""

import torch

from alignkit import runtime


def test_ranks_on_one_machine_split_the_cores(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launchers' fallback, not a choice
    try:
        assert runtime.fit_threads_to_ranks() == max(1, runtime.physical_cores() // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def test_a_users_thread_count_and_single_processes_are_kept(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.fit_threads_to_ranks() is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.fit_threads_to_ranks() is None and torch.get_num_threads() == threads
