#!/usr/bin/env bash
# mypy on pipelines/ and serve/ as the package `shopreel` (the repository root is the package, so a
# plain `mypy pipelines` would name it after the checkout directory).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ln -s "$root" "$tmp/shopreel"
cd "$tmp"
MYPYPATH="$tmp" "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" \
  -p shopreel.pipelines -p shopreel.serve -p shopreel.kernels "$@"
