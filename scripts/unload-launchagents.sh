#!/usr/bin/env bash
# macOS: stop and remove the launchd agents of router and sidecar (the install stays).
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/unload-services.sh" "$@"
