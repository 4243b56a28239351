#!/usr/bin/env bash
# Set up a fresh machine for tessera: espeak-ng (Debian, for the offline speech corpus) and a virtual
# environment in .venv with tessera and its dev extra. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q espeak-ng >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q espeak-ng >/dev/null; }
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get install -y -q espeak-ng >/dev/null 2>&1 || { sudo apt-get update -q >/dev/null && sudo apt-get install -y -q espeak-ng >/dev/null; }
  else
    echo "tessera needs espeak-ng to speak the digits corpus offline. Install it, then run this again:" >&2
    echo "    sudo apt-get install -y espeak-ng" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Every package comes from requirements.lock at the exact version and hash it names (scripts/lock.sh writes
# it), so a new upstream release cannot change what a fresh machine gets. tessera itself is then installed
# in editable mode without touching its dependencies or fetching a build backend.
.venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

# Fail here, with a way out, rather than in the first stage of the demo.
if ! .venv/bin/python scripts/check_env.py; then
  echo "The environment in .venv does not load. To rebuild it from the lock:" >&2
  echo "    rm -rf .venv && bash scripts/setup.sh" >&2
  exit 1
fi
