"""requirements.lock (what the README's commands and CI install) must agree with pyproject.toml.

A dependency added to, removed from or re-pinned in one of the two files and not the other fails here;
`bash scripts/lock.sh` rewrites the lock from pyproject.toml.
"""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
VIA_PYPROJECT = re.compile(r"^tessera \(pyproject\.toml(::build-system\.requires)?\)$")


def read_lock(text: str) -> dict[str, dict]:
    """{name: {"version": str, "hashes": int, "via": [str]}} from a pip-compile lock with hashes."""
    entries: dict[str, dict] = {}
    current = None
    via_block = False
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", raw)
        if m:
            current = {"version": m.group(2), "hashes": 0, "via": []}
            entries[canonicalize_name(m.group(1))] = current
            via_block = False
        elif current is not None and line.startswith("--hash=sha256:"):
            current["hashes"] += 1
        elif current is not None and line.startswith("# via"):
            rest = line[len("# via"):].strip()
            if rest:
                current["via"].append(rest)
            via_block = not rest
        elif current is not None and via_block and line.startswith("#   "):
            current["via"].append(line[1:].strip())
        elif line and not line.startswith("#"):
            raise AssertionError(f"requirements.lock: cannot read line {raw!r}")
    return entries


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in project["project"]["dependencies"]]
    for extra, items in project["project"]["optional-dependencies"].items():
        if extra == "dev":
            reqs += [Requirement(r) for r in items]
    reqs += [Requirement(r) for r in project["build-system"]["requires"]]
    return reqs


def check(lock_text: str, reqs: list[Requirement]) -> list[str]:
    """The disagreements between a lock and the declared requirements (empty: they agree)."""
    lock = read_lock(lock_text)
    problems = []
    names = set()
    for r in reqs:
        name = canonicalize_name(r.name)
        names.add(name)
        if name not in lock:
            problems.append(f"{r.name} is in pyproject.toml but not in requirements.lock")
        elif not r.specifier.contains(lock[name]["version"], prereleases=True):
            problems.append(f"{r.name}=={lock[name]['version']} in the lock is outside {r} in pyproject.toml")
    for name, e in lock.items():
        if not e["via"]:
            problems.append(f"{name} in requirements.lock is required by nothing (no '# via')")
        direct = any(VIA_PYPROJECT.match(v) for v in e["via"])
        if direct and name not in names:
            problems.append(f"{name} is in requirements.lock as a direct dependency but not in pyproject.toml")
        if not e["hashes"]:
            problems.append(f"{name} in requirements.lock has no hash")
    return problems


def test_lock_agrees_with_pyproject():
    assert check((ROOT / "requirements.lock").read_text(), declared()) == []


def test_torch_and_torchaudio_are_one_exact_release():
    exact = {canonicalize_name(r.name): r for r in declared() if r.name in ("torch", "torchaudio")}
    assert set(exact) == {"torch", "torchaudio"}
    for r in exact.values():
        (spec,) = r.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{r} must be one exact release"
    assert {str(r.specifier) for r in exact.values()} == {"==2.11.0"}


def test_check_catches_a_dependency_in_one_file_only():
    text = (ROOT / "requirements.lock").read_text()
    reqs = declared()
    assert any("webdataset" in p for p in check(text, reqs + [Requirement("webdataset>=0.2")]))
    extra = "webdataset==0.2.100 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via tessera (pyproject.toml)\n"
    assert any("webdataset" in p for p in check(text + extra, reqs))
    moved = re.sub(r"^numpy==\S+", "numpy==1.0.0", text, flags=re.MULTILINE)
    assert any("numpy" in p for p in check(moved, reqs))
