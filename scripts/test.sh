#!/usr/bin/env bash
# The test command of the README (and of CI): set up, lint, type-check, run every test.
# Pass pytest arguments to narrow it, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
bash scripts/mypy.sh
.venv/bin/python -m pytest -q "$@"
