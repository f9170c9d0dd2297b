#!/usr/bin/env bash
# Run the whole test suite: builds .venv with the project and its test extras, makes sure a
# system OpenBLAS is there (Linux CPU), lints, then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

py=$(tq_find_python)
[ -n "$py" ] || { echo "tqstack: python >= 3.10 is required" >&2; exit 1; }
venv=${TQSTACK_TEST_VENV:-.venv}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# pip's output goes to a log, shown only when the install fails.
log=$(mktemp)
if ! { "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip &&
       "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"; } >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; echo "tqstack: installing the test environment failed" >&2; exit 1
fi
rm -f "$log"
tq_ensure_openblas
tq_preload_openblas
# Real-model tests share one converted model across runs.
export TQSTACK_TEST_MODELS_DIR=${TQSTACK_TEST_MODELS_DIR:-$PWD/.cache/models}

"$venv/bin/ruff" check services tests bench
"$venv/bin/ruff" format --check services tests bench
exec "$venv/bin/python" -m pytest "$@"
