#!/usr/bin/env bash
# The main job on one machine: set up, start the serving cluster (embedded Ray, tiny preset, CPU),
# make a product video through its HTTP API, then stop the cluster (SHOPREEL_KEEP=1 leaves it up).
#   SHOPREEL_PORT   HTTP port (default 8000)
#   SHOPREEL_DATA   job records and videos (default shopreel-data/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port=${SHOPREEL_PORT:-8000}
log=shopreel-serve.log
.venv/bin/shopreel serve --port "$port" --data-dir "${SHOPREEL_DATA:-shopreel-data}" >"$log" 2>&1 &
server=$!
stop() { if [ -z "${SHOPREEL_KEEP:-}" ]; then kill -TERM "$server" 2>/dev/null && wait "$server" || true; fi; }
trap stop EXIT
echo "quickstart: starting the cluster on port $port (log: $log) ..." >&2
.venv/bin/shopreel remote examples/brief_en.json -o out.mp4 --url "http://127.0.0.1:$port" --wait 600 \
  || { tail -n 30 "$log" >&2; exit 1; }
[ -n "${SHOPREEL_KEEP:-}" ] && echo "quickstart: cluster still serving at http://127.0.0.1:$port (pid $server)" >&2
exit 0
