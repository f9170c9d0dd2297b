#!/usr/bin/env bash
# Give Ollama the settings the stack expects: OLLAMA_MLX=1 (its MLX backend on Apple Silicon,
# Ollama >= 0.19) and OLLAMA_FLASH_ATTENTION=1. Ollama reads them only when it starts, so it
# must be restarted afterwards; --restart does that where we can.
#   macOS:  launchctl setenv (for the Ollama app), then quit and reopen Ollama.
#   Linux:  a systemd drop-in for ollama.service (root), else the commands to run.
#   bash scripts/start-ollama-optimized.sh [--restart] [--dry-run]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

restart=0 dry=0
for arg in "$@"; do
  case "$arg" in
    --restart) restart=1 ;;
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) tq_die "unknown argument $arg" ;;
  esac
done
vars=(OLLAMA_MLX=1 OLLAMA_FLASH_ATTENTION=1)
run() { if [ "$dry" = 1 ]; then echo "would run: $*"; else "$@"; fi; }

v=$(tq_ollama_version "${OLLAMA_URL:-http://127.0.0.1:11434}")
if [ -z "$v" ]; then tq_warn "Ollama not found; the settings apply once it is installed"
elif ! tq_version_ge "$v" 0.19; then tq_warn "Ollama $v < 0.19 has no MLX backend; OLLAMA_MLX is ignored until you upgrade"
else tq_say "Ollama $v"; fi

if [ "$(uname -s)" = "Darwin" ]; then
  for kv in "${vars[@]}"; do run launchctl setenv "${kv%%=*}" "${kv#*=}"; done
  tq_say "set ${vars[*]} for apps started by launchd (the Ollama app)."
  tq_say "launchctl setenv lasts until logout; run this script again after logging in."
  if [ "$restart" = 1 ]; then
    run osascript -e 'quit app "Ollama"' || true
    sleep 2
    run open -a Ollama
    tq_say "Ollama restarted with the new settings."
  else
    tq_say "Now quit Ollama (menu bar icon > Quit) and reopen it, or re-run with --restart."
  fi
  exit 0
fi

dropin_dir=${OLLAMA_DROPIN_DIR:-/etc/systemd/system/ollama.service.d}
dropin="[Service]
Environment=\"OLLAMA_MLX=1\"
Environment=\"OLLAMA_FLASH_ATTENTION=1\""
if command -v systemctl >/dev/null 2>&1 && systemctl cat ollama.service >/dev/null 2>&1 \
   && { [ "$(id -u)" = 0 ] || [ -n "${OLLAMA_DROPIN_DIR:-}" ]; }; then
  run mkdir -p "$dropin_dir"
  if [ "$dry" = 1 ]; then echo "would write $dropin_dir/tqstack.conf:"; echo "$dropin"
  else printf '%s\n' "$dropin" >"$dropin_dir/tqstack.conf"; fi
  run systemctl daemon-reload
  tq_say "wrote $dropin_dir/tqstack.conf (${vars[*]})."
  if [ "$restart" = 1 ]; then run systemctl restart ollama.service; tq_say "ollama.service restarted."
  else tq_say "Restart Ollama to apply it: systemctl restart ollama (or re-run with --restart)."; fi
elif command -v systemctl >/dev/null 2>&1 && systemctl cat ollama.service >/dev/null 2>&1; then
  tq_say "ollama.service is a system unit; as root, run this script again, or do it by hand:"
  echo "  sudo mkdir -p $dropin_dir, then write these lines to $dropin_dir/tqstack.conf:"
  printf '%s\n' "$dropin" | sed 's/^/    /'
  echo "  sudo systemctl daemon-reload && sudo systemctl restart ollama"
else
  tq_say "Ollama is not a systemd service here. Start it with the settings in its environment:"
  echo "  ${vars[*]} ollama serve"
  tq_say "(or add 'export ${vars[*]}' to the shell profile that starts it, then restart it)"
fi
