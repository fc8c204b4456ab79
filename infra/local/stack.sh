#!/usr/bin/env bash
# The local tracking stack (SeaweedFS S3 + bucket + MLflow server, optionally PostgreSQL
# and basic auth): stack.sh up|down|status [--dir .stack] [--backend sqlite|postgres] [--auth] ...
# `stack.sh --help` lists every flag. Runs this checkout's code, with the repository's
# .venv when there is one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="$root/.venv/bin/python"
[ -x "$python" ] || python=python3
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m infra.local.stack "$@"
