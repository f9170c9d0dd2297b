#!/usr/bin/env bash
# Stop the installed router and sidecar and remove their agents/units/pid files, whatever
# started them (launchd, systemd --user or detached). Keeps the install; load-services.sh
# starts them again.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
# shellcheck source=scripts/lib/services.sh
. "$here/lib/services.sh"

tq_svc_init
tq_services_stop_all
tq_say "services of $TQ_HOME stopped"
