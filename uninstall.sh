#!/usr/bin/env bash
# Remove tqstack: stop and remove its agents/units/detached processes, the virtualenv and the
# installed files. Keeps config.env, converted models and logs unless --purge.
# Never touches Ollama, its models or its settings.
#   bash uninstall.sh [--purge]        (TQSTACK_HOME picks the install; default ~/ai/turboquant)
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$src/scripts/lib/common.sh"
# shellcheck source=scripts/lib/services.sh
. "$src/scripts/lib/services.sh"

purge=0
for arg in "$@"; do
  case "$arg" in
    --purge) purge=1 ;;
    -h|--help) sed -n '2,5p' "$0" | cut -c3-; exit 0 ;;
    *) tq_die "unknown argument $arg (see --help)" ;;
  esac
done

TQSTACK_HOME=$(tq_home)
export TQSTACK_HOME
case "$TQSTACK_HOME" in /|"$HOME"|"$HOME/") tq_die "refusing to remove TQSTACK_HOME=$TQSTACK_HOME" ;; esac
if [ ! -d "$TQSTACK_HOME/venv" ] && [ ! -d "$TQSTACK_HOME/app" ] && [ ! -f "$TQSTACK_HOME/config.env" ]; then
  tq_say "no tqstack install at $TQSTACK_HOME; still removing any agents/units that point there"
fi
tq_svc_init
# Read what we need from the config before anything is removed.
models_dir=""
router_port=8000
sidecar_port=8001
if [ -f "$TQ_CONFIG" ]; then
  models_dir=$(tq_cfg MODELS_DIR)
  router_port=$(tq_cfg ROUTER_PORT)
  sidecar_port=$(tq_cfg SIDECAR_PORT)
fi

tq_services_stop_all
removed=()
for p in "$TQ_HOME/venv" "$TQ_HOME/app" "$TQ_HOME/app.new" "$TQ_HOME/bin" "$TQ_HOME/run"; do
  if [ -e "$p" ]; then rm -rf "$p"; removed+=("$p"); fi
done
kept=()
if [ "$purge" = 1 ]; then
  for p in "$TQ_CONFIG" "$TQ_HOME/models" "$TQ_HOME/logs" "$HOME/Library/Logs/tqstack-router.log" \
           "$HOME/Library/Logs/tqstack-router.err.log" "$HOME/Library/Logs/tqstack-sidecar.log" \
           "$HOME/Library/Logs/tqstack-sidecar.err.log"; do
    if [ -e "$p" ]; then rm -rf "$p"; removed+=("$p"); fi
  done
  # A MODELS_DIR outside the install may be shared with other things: left alone.
  if [ -n "$models_dir" ] && [ -d "$models_dir" ]; then kept+=("$models_dir (MODELS_DIR outside the install)"); fi
  rmdir "$TQ_HOME" 2>/dev/null || true
else
  for p in "$TQ_CONFIG" "${models_dir:-$TQ_HOME/models}" "$TQ_HOME/logs"; do
    [ -e "$p" ] && kept+=("$p")
  done
fi

echo "tqstack uninstalled from $TQ_HOME"
[ "${#removed[@]}" -eq 0 ] || printf '  removed %s\n' "${removed[@]}"
[ "${#kept[@]}" -eq 0 ] || printf '  kept    %s\n' "${kept[@]}"
[ "$purge" = 1 ] || echo "  (bash uninstall.sh --purge also removes config.env, models and logs)"
echo "  Ollama and its models were not touched."
for port in "$router_port" "$sidecar_port"; do
  if tq_port_busy "$port"; then tq_warn "port $port is still in use (not by this install's services)"; fi
done
