#!/usr/bin/env bash
# Run the router in the foreground on ROUTER_HOST:ROUTER_PORT (default 127.0.0.1:8000),
# in front of Ollama (OLLAMA_URL, default http://127.0.0.1:11434) and the sidecar
# (SIDECAR_URL, default http://127.0.0.1:8001). Settings come from config.env
# ($TQSTACK_CONFIG, else $TQSTACK_HOME/config.env) when present; every key can be
# overridden by an environment variable of the same name. Extra arguments go to
# tqstack-router (--host, --port, --config).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

tq_launcher_env "$repo"
py=$TQ_PY
"$py" -c 'import services.router.app' 2>/dev/null \
  || tq_die "$py cannot import tqstack (run install.sh, or pip install -e '$repo')"

cd "$repo"
exec "$py" -m services.router "$@"
