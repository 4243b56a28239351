"""The host allocator setting of CPU training: after it, a training step's large buffers stop costing page
faults (measured in a fresh interpreter, since the setting is the whole process's)."""

import platform
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import torch
from tessera.runtime.host_memory import keep_freed_memory

torch.set_num_threads(1)

def faults_per_step():
    x = torch.randn(2048, 256)
    w = torch.randn(5632, 256, requires_grad=True)
    for _ in range(24):  # warm-up: the heap grows to the step's peak and its layout settles (4-21 steps seen)
        w.grad = None
        (x @ w.t()).log_softmax(-1).sum().backward()
    windows = []
    for _ in range(4):  # the quietest of four 8-step windows: a layout that settles late gets three more chances
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            w.grad = None
            (x @ w.t()).log_softmax(-1).sum().backward()  # 46 MB logits, their gradient
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8)
    return min(windows)

before = faults_per_step()
applied, why = keep_freed_memory()
after = faults_per_step()
print(before, after, applied)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keeping_freed_memory_removes_the_page_faults_of_each_step():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after, applied = r.stdout.split()
    assert applied == "True"
    assert float(before) > 20_000  # each 46 MB buffer mapped afresh: ~11,000 pages, about four per step
    assert float(after) < 0.05 * float(before)  # 0 once the layout has settled


def test_elsewhere_than_glibc_it_changes_nothing_and_says_why(monkeypatch):
    from tessera.runtime import host_memory

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.keep_freed_memory() == (False, f"not glibc ({platform.system()}, unknown libc): "
                                                      "the allocator is left as it is")
