#!/usr/bin/env bash
# The wheels a bare device machine (Python 3.12, x86-64) lacks for tslm: pydantic and what it needs.
# Run here, in the checkout's root, before the device call; then carry .whl (run.sh installs them there).
set -eu
cd "$(dirname "$0")/../.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
    "typing-extensions==4.16.0"
ls -la .whl
