#!/usr/bin/env bash
# mypy over the installed package's source tree (everything lives under hkd/).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m mypy --config-file pyproject.toml -p hkd "$@"
