"""alignkit.speedups.cpu.fit_cpu_allocator: freed tensor memory stays in the process (fewer page faults on reuse)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# a step's pattern: activations of (1384, 1536) fp32 (8-12 MiB) held together with LM-head probabilities (200 MiB).
# Measured after 3 warm-up steps: until the heap has grown to the step's pattern, where the first steps' chunks land
# depends on the heap's layout (the modules imported, ASLR), and 1 warm-up step left 2k-150k faults with the same code.
PROBE = """
import resource, torch
from alignkit.speedups import cpu
applied = cpu.fit_cpu_allocator()
def step():
    held = [torch.ones(n) for n in (2 << 20, 3 << 20, 2 << 20, 50 << 20, 2 << 20)]
    del held
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "ALIGNKIT_CPU"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def test_reused_memory_is_not_faulted_in_again():
    applied, faults = _probe()
    system, system_faults = _probe(ALIGNKIT_CPU_ALLOCATOR="system")
    assert (applied, system) == ("True", "False")
    # glibc's defaults unmap every tensor on free: 5 steps x 59 MiB faulted in again (~75000 pages)
    assert system_faults > 60000, system_faults
    assert faults < system_faults / 2, (faults, system_faults)


def test_user_tunables_are_kept():
    applied, _ = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert applied == "False"
