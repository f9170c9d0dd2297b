#!/usr/bin/env bash
# At-a-glance status of the installed stack (router, sidecar, Ollama, memory); exits non-zero
# when the router is down. Arguments go to tqstack-status (--json, --url URL).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
TQSTACK_HOME=$(tq_home)
export TQSTACK_HOME
for exe in "$TQSTACK_HOME/venv/bin/tqstack-status" "$here/../.venv/bin/tqstack-status"; do
  if [ -x "$exe" ]; then exec "$exe" "$@"; fi
done
tq_die "tqstack-status not found: run install.sh first"
