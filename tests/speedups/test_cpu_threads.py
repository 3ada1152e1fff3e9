"""alignkit.speedups.cpu.fit_cpu_threads: ranks sharing one CPU machine split its physical cores, and a run on a machine
others keep busy uses fewer threads."""

import os

import pytest
import torch

from alignkit.speedups import cpu

BUSY_CORES = cpu.busy_cores


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _busy_now(monkeypatch):
    """The machine is as busy now as its load average says (tests set the load average); one test changes it."""
    monkeypatch.setattr(cpu, "busy_cores", lambda: 64.0)


def test_busy_cores_reads_the_machine():
    busy = BUSY_CORES(0.05)
    assert busy is None or 0.0 <= busy <= os.cpu_count()


def test_a_load_average_left_by_a_finished_run_does_not_cost_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu, "physical_cores", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    torch.set_num_threads(8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # the last minute was busy...
    monkeypatch.setattr(cpu, "busy_cores", lambda: 0.1)  # ...but nothing else runs now
    assert cpu.fit_cpu_threads() is None and torch.get_num_threads() == 8
    monkeypatch.setattr(cpu, "busy_cores", lambda: 3.0)  # three cores busy now, load average says five
    assert cpu.fit_cpu_threads() == 5


def test_busy_hyper_threads_count_as_busy_cores(monkeypatch):
    """4 physical cores, 8 logical: three other processes busy now (3 logical CPUs, on 3 physical cores) and in the
    load average leave 1 core, not 4 - 3 * 4 / 8."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu, "physical_cores", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    torch.set_num_threads(4)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0, 4.0, 4.0))  # this process and three others
    monkeypatch.setattr(cpu, "busy_cores", lambda: 3.0)
    assert cpu.fit_cpu_threads() == 1


def test_ranks_on_one_machine_split_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launchers' fallback, not a choice
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(cpu, "physical_cores", lambda: 8)
    assert cpu.fit_cpu_threads() == 4 == torch.get_num_threads()


def test_a_busy_machine_gets_fewer_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu, "physical_cores", lambda: 8)
    torch.set_num_threads(8)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # this process + 5 others
    assert cpu.fit_cpu_threads() == 3 == torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 30.0, 30.0))
    assert cpu.fit_cpu_threads() == 1
    torch.set_num_threads(8)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only this process: keep torch's count
    assert cpu.fit_cpu_threads() is None and torch.get_num_threads() == 8


def test_a_users_thread_count_is_kept(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 30.0, 30.0))
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu.fit_cpu_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cpu.fit_cpu_threads() is None and torch.get_num_threads() == threads
