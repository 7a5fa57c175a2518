#!/usr/bin/env bash
# tests/gpu/check.py on a GPU machine, stopped after 540 s (GPU_CHECK_TIMEOUT); results in /tmp/gpu_check
# (GPU_CHECK_OUT). Extra arguments go to check.py (e.g. --only speed_defaults,fit_memory --deadline 240).
# Wheels in .whl/ (a bare device machine lacks pydantic; tests/gpu/fetch_wheels.sh downloads them) are installed
# to /tmp/site first. Where $OUT is a directory (the device tool's), results.jsonl and gpu_logs.tgz are copied there.
set -u
cd "$(dirname "$0")/../.." || exit 2
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
out="${GPU_CHECK_OUT:-/tmp/gpu_check}"
timeout "${GPU_CHECK_TIMEOUT:-540}" python3 tests/gpu/check.py --out "$out" "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$out/results.jsonl" "$OUT/" 2>/dev/null
    tar czf "$OUT/gpu_logs.tgz" -C "$out" logs 2>/dev/null
fi
exit $rc
