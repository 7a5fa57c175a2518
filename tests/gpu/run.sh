#!/usr/bin/env bash
# tests/gpu/check.py on a GPU machine: results in /tmp/gpu_check (or --out DIR). Wheels in .whl/ (a bare device
# machine lacks pydantic; tests/gpu/fetch_wheels.sh downloads them) are installed to /tmp/site first.
#   timeout 540 bash tests/gpu/run.sh --out "$OUT/gpu"
set -u
cd "$(dirname "$0")/../.." || exit 2
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 tests/gpu/check.py --out /tmp/gpu_check "$@"
