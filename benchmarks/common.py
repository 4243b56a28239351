"""What every benchmark records beside its numbers, written one way: the machine, the thread count and the
versions of the libraries that set the speed, and peak resident memory counted from a chosen point (after
a side has built its model, not while it held a second copy to convert from).

The scripts import it as a sibling (`python benchmarks/x.py` puts this folder first on sys.path).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from tessera.storage import atomic_write_json

# the installed distributions whose releases move a benchmark's figures; those missing are left out
LIBRARIES = ("torch", "torchaudio", "transformers", "numpy", "pillow", "soundfile", "sentencepiece",
             "vector-quantize-pytorch", "webdataset", "pyarrow")


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None, **extra) -> dict:
    """The machine a result was measured on: CPU, cores, torch's thread count (at the call: call it where the
    run's count is set), the GPU when the run used one, the load average, and the library versions."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "platform": platform.platform(), "processor": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "libraries": library_versions(),
    }
    info.update(extra)
    return info


def write_result(path: str | Path, result: dict) -> Path:
    """The result JSON, written atomically (a run killed while writing leaves the previous file whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    print(f"-> {path}", flush=True)
    return path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The process's resident memory now, MB (Linux)."""
    kb = _status_kb("VmRSS")
    if kb is None:
        raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")
    return kb / 1024


def reset_peak_rss() -> bool:
    """Start the process's peak resident memory afresh from its current size (Linux 4.0+: `clear_refs` 5), so
    that what `peak_rss_mb` reports next excludes what came before, such as building the model. False where
    the kernel does not allow it; the peak then counts from the process's start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory since its start or the last `reset_peak_rss`, MB."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: getrusage's high-water mark, from the start (kB on Linux, bytes on macOS)
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if platform.system() == "Darwin" else 1)
    return kb / 1024
