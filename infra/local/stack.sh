#!/usr/bin/env bash
# The local tracking stack (SeaweedFS S3 + MLflow server): up | down | status.
# Uses the project's virtual environment when there is one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$here/../../.venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" "$here/stack.py" "$@"
