"""Atomic, pickle-free checkpoints shared by every trainer (image codec, audio codec, decoder).

    run/checkpoints/
      step_000200/        one complete checkpoint
        model.safetensors, optimizer.safetensors, ...   tensors (any names the trainer chooses)
        state.json        step, configs, scheduler, loader state, RNG, counters (written last)
      latest              {"step": 200, "dir": "step_000200"}, replaced atomically after the directory

A checkpoint is written into a hidden temporary directory and renamed into place, then `latest` is
replaced, so a crash at any moment leaves the previous checkpoint intact and `latest` pointing at a
complete one. Tensors go to safetensors and everything else to JSON: loading never unpickles.

A `step_N` directory is complete or absent. state.json is its completion marker (written last, and it
names the tensor files); a directory without it, or without a file it names, is never loaded. An old
checkpoint is pruned by renaming it to `.trash-step_N` first and deleting it after, so a kill during the
deletion leaves a hidden leftover, not a half-deleted `step_N`; `clean()` (at every save, and by a
trainer at startup) removes such leftovers and those of an interrupted save.

`RunLock` keeps two runs out of one run directory: an exclusive `flock` on `RUN/.lock`, held for the life of
the run and released by the kernel when the process ends, however it ends (kill -9 leaves no stale lock).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.errors import TesseraError
from tessera.storage import atomic_write_json, load_tensors, make_temp_dir, read_json, replace_dir, save_tensors

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

STEP_DIR = re.compile(r"^step_(\d+)$")
TRASH_PREFIX = ".trash-"


class CheckpointError(TesseraError):
    pass


def _is_complete(d: Path) -> bool:
    """state.json is there (written last) and so is every tensor file it names."""
    try:
        state = read_json(d / "state.json")
    except (OSError, ValueError):
        return False
    files = state.get("files") if isinstance(state, dict) else None
    return all((d / f).is_file() for f in files) if isinstance(files, list) else True


class CheckpointManager:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = max(1, keep)

    def _complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for p in self.root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and _is_complete(p):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        ptr = self.root / "latest"
        if ptr.is_file():
            try:
                info = read_json(ptr)
                if STEP_DIR.match(info["dir"]) and _is_complete(self.root / info["dir"]):
                    return int(info["step"])
            except (ValueError, KeyError, TypeError):
                pass
        steps = self._complete_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> Path:
        """Write `tensors[name]` to `name.safetensors` and `state` to state.json, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        tmp = make_temp_dir(self.root, f".tmp_step_{step}_")
        try:
            for name, tdict in tensors.items():
                save_tensors(tmp / f"{name}.safetensors", tdict)
            files = sorted(f"{name}.safetensors" for name in tensors)
            atomic_write_json(tmp / "state.json", {"step": step, **state, "files": files})
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(self.root / "latest", {"step": step, "dir": final.name})
        for old in self._complete_steps()[: -self.keep]:
            self._discard(self.step_dir(old))
        self.clean()
        return final

    def _discard(self, d: Path) -> None:
        """Delete a checkpoint directory: renamed out of the `step_N` namespace first, so a kill during the
        deletion leaves a `.trash-` leftover that `clean()` removes, never a half-deleted `step_N`."""
        trash = d.with_name(f"{TRASH_PREFIX}{d.name}")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(d, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def clean(self) -> list[str]:
        """Remove what an interrupted save or prune left: `.tmp_step_*` and `.trash-*` directories, and
        `step_N` directories without their completion marker (half-deleted by an older tessera). Only the
        process that owns the run directory (holding its `RunLock`) may call this. Returns the names removed."""
        if not self.root.is_dir():
            return []
        removed = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir():
                continue
            if p.name.startswith((".tmp_step_", TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
            elif STEP_DIR.match(p.name) and not _is_complete(p):
                self._discard(p)
                removed.append(p.name)
        return removed

    def load(self, step: int | None = None, device="cpu") -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.root}")
        d = self.step_dir(step)
        if not _is_complete(d):
            raise CheckpointError(f"{d} is not a complete checkpoint (its state.json or a file it names is missing)")
        state = read_json(d / "state.json")
        tensors = {p.stem: load_tensors(p, device) for p in d.glob("*.safetensors")}
        return tensors, state


# ------------------------------------------------------------------------------------------- run lock
class RunLockedError(TesseraError):
    pass


class RunLock:
    """An exclusive lock on an output directory: `flock` on `DIR/.lock`, which records the holder.

    `RunLock(run_dir).acquire()` creates the directory if needed and raises `error` (`RunLockedError` by
    default) naming the holder (pid, host, the command when given, start time) when another process holds it,
    after waiting up to `wait` seconds for it to end. The lock lives as long as the open file: `release()`,
    the end of the process, or its death (kill -9 included) frees it, so it never goes stale. The lock file
    itself is never deleted (deleting it would let two processes lock two different files). Local file
    systems and NFSv4 honour `flock` across processes and hosts. Training runs and shard sets both use it.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike, command: str | None = None, wait: float = 0.0,
                 error: type[TesseraError] = RunLockedError):
        self.path = Path(run_dir) / self.NAME
        self.command, self.wait, self.error = command, wait, error
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            command = f", {info['command']}" if info.get("command") else ""
            return f"pid {info['pid']} on {info['host']}{command}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def acquire(self) -> "RunLock":
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.1)
        except BlockingIOError:
            os.close(fd)
            raise self.error(f"{self.path.parent} is in use by another run ({self.holder()}); wait for it to "
                             f"end or use another --out") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), **({"command": self.command} if self.command else {}),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of the open file releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------ optimizer state
def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            key = f"{pid}\x1f{k}"
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
                scalars[key] = {"tensor": f"state.{pid}.{k}"}
            else:
                scalars[key] = {"value": v}
    return tensors, {"param_groups": sd["param_groups"], "entries": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, e in meta["entries"].items():
        pid, k = key.split("\x1f", 1)
        pid_key: Any = int(pid) if pid.lstrip("-").isdigit() else pid
        state.setdefault(pid_key, {})[k] = tensors[e["tensor"]] if "tensor" in e else e["value"]
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------ RNG state
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"].to(torch.uint8))
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def lock_run(lock: RunLock, env, only_an_existing_dir: bool) -> None:
    """Rank 0 takes the run's lock (with `only_an_existing_dir`, only if the directory exists: a run in
    progress is reported before the arguments are checked, and bad input creates nothing); every rank raises
    if it could not."""
    from tessera.runtime.distributed import broadcast_object

    error = None
    if env.is_main and not (only_an_existing_dir and not lock.path.parent.is_dir()):
        try:
            lock.acquire()
        except RunLockedError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise RunLockedError(error)
