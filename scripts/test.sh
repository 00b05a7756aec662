#!/usr/bin/env bash
# README command 2: set up everything the tests need and run them through tox.
#   bash scripts/test.sh            # lint + full test suite
#   bash scripts/test.sh -e py311 -- -k dicom    # extra arguments go to tox
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh
bash scripts/fetch_test_data.sh
if [ ! -x .venv-tox/bin/tox ]; then
  python3 -m venv .venv-tox
  .venv-tox/bin/pip install -q --upgrade pip
  .venv-tox/bin/pip install -q "tox>=4.11"
fi
exec .venv-tox/bin/tox "$@"
