#!/usr/bin/env bash
# The wheels a bare device machine (Python 3.12, x86-64) needs for tslm: pydantic and what it needs (absent there),
# and the CLI's typer/rich stack at the versions tested here (the image's typer is of an unknown, older version).
# Run here, in the checkout's root, before the device call; then carry .whl (run.sh installs them there, first on
# the path). .whl/ is git-ignored.
set -eu
cd "$(dirname "$0")/../.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
    "typing-extensions==4.16.0" "typer==0.29.2" "annotated-doc==0.0.7" "shellingham==1.5.4" "click==8.5.1" \
    "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2" "pygments==2.21.0"
ls -la .whl
