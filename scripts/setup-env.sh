#!/usr/bin/env bash
# Create the project's virtual environment and install the project with its test extras.
# torch: on machines whose pip is capped to local wheels (torch 2.14.1 + torchvision 0.29.1 lie on
# disk) that pair is taken; elsewhere pip resolves the newest pair that fits pyproject.toml.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ -f /etc/xdg/pip/constraints.txt ] && grep -q "torch<=2.14.1" /etc/xdg/pip/constraints.txt; then
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "environment ready: $VENV"
