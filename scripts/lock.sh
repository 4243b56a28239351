#!/usr/bin/env bash
# Regenerate requirements.lock: every package of the dev environment (tessera[dev] plus the build backend),
# at exact versions with their hashes, resolved from the package index that pip is configured with.
# Run it after changing dependencies in pyproject.toml; tests/test_lock.py fails until the two agree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools"
"$tools/bin/python" -m pip install -q --disable-pip-version-check "pip-tools==7.6.2"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/bin/pip-compile" -q \
  --extra dev --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
  --build-deps-for editable --output-file requirements.lock pyproject.toml "$@"
