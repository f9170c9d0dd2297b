#!/usr/bin/env bash
# Start one installed tqstack service (router or sidecar) from $TQSTACK_HOME's virtualenv.
# launchd agents and systemd units run this; detached mode runs it with --supervise, which
# restarts the service when it crashes (what KeepAlive/Restart= do for the other two).
#   usage: tqstack-service.sh [--supervise] router|sidecar
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

supervise=0
if [ "${1:-}" = "--supervise" ]; then supervise=1; shift; fi
svc=${1:-}
case "$svc" in router|sidecar) ;; *) tq_die "usage: tqstack-service.sh [--supervise] router|sidecar" ;; esac

TQSTACK_HOME=$(tq_home)
export TQSTACK_HOME
export TQSTACK_CONFIG=${TQSTACK_CONFIG:-$TQSTACK_HOME/config.env}
export PYTHONUNBUFFERED=1
exe="$TQSTACK_HOME/venv/bin/tqstack-$svc"
[ -x "$exe" ] || tq_die "$exe is missing: run install.sh again"
# MLX on Linux CPU: a system OpenBLAS makes float32 matmuls much faster (no-op elsewhere).
tq_preload_openblas

if [ "$supervise" = 0 ]; then
  exec "$exe"
fi

child=""
stop() {
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child" 2>/dev/null
  exit 0
}
trap stop TERM INT HUP
backoff=1
while :; do
  started=$(date +%s)
  tq_say "$(date -u +%FT%TZ) starting $svc (pid $$ supervises)"
  "$exe" &
  child=$!
  rc=0
  wait "$child" || rc=$?
  child=""
  # A service that ran a while gets a quick restart; one that keeps dying backs off to 60 s.
  if [ $(( $(date +%s) - started )) -gt 60 ]; then backoff=1; fi
  tq_say "$(date -u +%FT%TZ) $svc exited with status $rc; restarting in ${backoff}s"
  sleep "$backoff" &
  wait $! || true
  backoff=$(( backoff * 2 > 60 ? 60 : backoff * 2 ))
done
