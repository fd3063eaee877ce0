#!/bin/sh
# Run the inference test tool with the project's Python environment, from any working directory.
# Usage: send-inference-request.sh -h
set -eu
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
python="$here/../.venv/bin/python"
if [ ! -x "$python" ]; then
    # no project environment: a Python with the tool's requirements.txt, the repository's inference/ package
    python=python3
    PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
fi
exec "$python" "$here/send_inference_request.py" "$@"
