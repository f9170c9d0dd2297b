#!/usr/bin/env bash
# macOS: install and (re)start the launchd agents of router and sidecar (KeepAlive, logs in
# ~/Library/Logs/tqstack-*.log). On Linux use load-services.sh.
set -euo pipefail
[ "$(uname -s)" = "Darwin" ] || [ "${TQSTACK_SERVICE_MODE:-}" = "launchd" ] \
  || { echo "tqstack: launchd is macOS only; use scripts/load-services.sh" >&2; exit 1; }
TQSTACK_SERVICE_MODE=launchd exec bash "$(dirname "${BASH_SOURCE[0]}")/load-services.sh" "$@"
