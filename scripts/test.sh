#!/usr/bin/env bash
# Install everything (scripts/setup.sh --test) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [[ $status == 5 ]]; then
  echo "[test] pytest collected no tests: that is a failure" >&2
fi
exit $status
