"""Compiled CPU kernels are made for the running thread count, not reused from a run with another count."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
if sys.argv[2] == "pin":
    from tessera.runtime.inductor import pin_cpu_threads
    assert pin_cpu_threads() == int(sys.argv[1])
f = torch.compile(lambda x: (x.sin() * 2 + x.cos()).sum(-1), dynamic=False)
print(float(f(torch.randn(512, 4096)).sum()))
"""


def run(threads: int, mode: str, cache: Path) -> None:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", CHILD, str(threads), mode], check=True, env=env, timeout=300,
                   capture_output=True)


def generated(cache: Path, text: str) -> int:
    """How many generated wrapper files (each holds its C++ kernels' source) contain `text`."""
    return sum(text in p.read_text(errors="ignore") for p in cache.rglob("*.py"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler (g++)")
def test_compiled_kernels_follow_the_thread_count(tmp_path):
    cache = tmp_path / "inductor"
    run(1, "plain", cache)
    assert generated(cache, "num_threads(") == 0  # one thread: no parallel loops
    run(2, "plain", cache)  # inductor's cache as it comes (torch 2.11): the one-thread kernels are served again
    if generated(cache, "num_threads(2)"):
        pytest.skip("this torch keys its CPU kernels by thread count itself: nothing for the pin to fix")
    run(2, "pin", cache)  # pinned: the thread count is in the key and in the kernels
    assert generated(cache, "num_threads(2)") >= 1
