#!/usr/bin/env bash
# (Re)start the installed router and sidecar as background services: launchd agents on macOS,
# systemd --user units where a user systemd runs, detached supervised processes otherwise.
# Safe to repeat: whatever ran before is stopped first (this is also how to apply a config edit).
#   TQSTACK_SERVICE_MODE=auto|launchd|systemd|detached  picks the manager (default auto)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=scripts/lib/services.sh
. "$here/lib/services.sh"

tq_svc_init
[ -x "$TQ_HOME/venv/bin/tqstack-router" ] || tq_die "no install at $TQ_HOME: run install.sh first"
[ -f "$TQ_CONFIG" ] || tq_die "$TQ_CONFIG is missing: run install.sh first"
mode=$(tq_service_mode)
tq_services_stop_all
tq_services_start "$mode"
