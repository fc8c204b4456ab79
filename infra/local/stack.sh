#!/usr/bin/env bash
# The local tracking stack (SeaweedFS S3 + bucket + MLflow server, optionally PostgreSQL
# and basic auth): stack.sh up|down|status [--dir .stack] [--backend sqlite|postgres] [--auth] ...
# `stack.sh --help` lists every flag. Uses the repository's .venv when there is one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../../.venv/bin/python"
[ -x "$python" ] || python=python3
PYTHONPATH="$here/../..${PYTHONPATH:+:$PYTHONPATH}" exec "$python" "$here/stack.py" "$@"
