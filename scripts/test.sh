#!/usr/bin/env bash
# The README's test command: a fresh virtual environment, everything from requirements.txt, lint,
# then the whole suite on CPU (8 fake devices for the multi-device tests, set in tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${GDIFF_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/ruff" check gdiff configs tests main.py benchmarks
"$VENV/bin/ruff" format --check gdiff configs tests main.py benchmarks
export JAX_PLATFORMS=cpu
set +e
"$VENV/bin/python" -m pytest -n 2 --dist loadfile -q "$@" 2>&1 | tee /tmp/gdiff-pytest.log
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 5 ]; then
  echo "FAIL: pytest collected no tests" >&2
  exit 1
fi
grep -Eq "[0-9]+ passed" /tmp/gdiff-pytest.log || { echo "FAIL: no test passed" >&2; exit 1; }
exit "$status"
