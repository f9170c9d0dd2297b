#!/usr/bin/env bash
# Check that this machine can run tqstack; install.sh runs it first. Prints one line per check
# and exits 1 when something blocks the install (warnings do not).
#   Honours TQSTACK_HOME, ROUTER_PORT, SIDECAR_PORT, OLLAMA_URL, SIDECAR_MODEL, TQSTACK_MIN_DISK_MB.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

home=$(tq_home)
template=$here/../docs/config.env.example
[ -f "$template" ] || template=$here/../../docs/config.env.example
fails=0
ok() { printf '  ok    %s\n' "$*"; }
warn() { printf '  warn  %s\n' "$*"; }
fail() { printf '  FAIL  %s\n' "$*"; fails=$((fails + 1)); }

echo "tqstack preflight for $home"
os=$(uname -s) arch=$(uname -m)
case "$os/$arch" in
  Darwin/arm64) ok "macOS on Apple Silicon: MLX uses Metal" ;;
  Darwin/*) fail "macOS on $arch: MLX needs Apple Silicon (arm64)" ;;
  Linux/x86_64|Linux/aarch64)
    if [ "${TQSTACK_CUDA:-0}" = "1" ]; then ok "Linux $arch: MLX with CUDA (TQSTACK_CUDA=1)"
    else ok "Linux $arch: MLX on CPU (set TQSTACK_CUDA=1 for NVIDIA GPUs)"; fi ;;
  *) fail "$os/$arch is not supported (macOS arm64 or Linux x86_64/aarch64)" ;;
esac

py=$(tq_find_python)
if [ -z "$py" ]; then
  fail "python >= 3.10 not found (set TQSTACK_PYTHON=/path/to/python3)"
else
  ok "python $("$py" -c 'import platform; print(platform.python_version())') at $py"
  "$py" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$py lacks venv/ensurepip (Debian/Ubuntu: apt-get install python3-venv)"
fi
if command -v curl >/dev/null 2>&1; then ok "curl"; else fail "curl is required"; fi

cfg() {  # value from the environment, else an existing config.env, else the default
  local v=${!1:-}
  if [ -z "$v" ] && [ -n "$py" ]; then
    v=$("$py" "$here/lib/configenv.py" get --template "$template" --config "$home/config.env" "$1")
  fi
  printf '%s' "$v"
}

ram=0
[ -n "$py" ] && ram=$("$py" "$here/lib/sysinfo.py" ram)
ram_gb=$(( ram / 1024 / 1024 / 1024 ))
if [ "$ram" -eq 0 ]; then warn "could not read the amount of RAM"
elif [ "$ram_gb" -lt 4 ]; then fail "${ram_gb} GB RAM: at least 4 GB is needed"
elif [ "$ram_gb" -lt 32 ]; then ok "${ram_gb} GB RAM (under 32 GB: memory saver on, large sidecar models off by default)"
else ok "${ram_gb} GB RAM"; fi

need_mb=${TQSTACK_MIN_DISK_MB:-3072}
free_mb=$(tq_free_mb "$home")
if [ "$free_mb" -lt "$need_mb" ]; then fail "$((free_mb / 1024)) GB free under $home; need $((need_mb / 1024)) GB"
else ok "$((free_mb / 1024)) GB free under $home"; fi

for key in ROUTER_PORT SIDECAR_PORT; do
  port=$(cfg "$key")
  if ! tq_port_busy "$port"; then
    ok "port $port free ($key)"
  elif curl -s --max-time 2 "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"status"'; then
    ok "port $port ($key) is held by a tqstack service; the install restarts it"
  else
    fail "port $port ($key) is used by another program; free it or set $key=<port>"
  fi
done

ollama_url=$(cfg OLLAMA_URL)
v=$(tq_ollama_version "$ollama_url")
if [ -z "$v" ]; then
  warn "Ollama not found at $ollama_url: optional; every request will go to the sidecar"
elif tq_version_ge "$v" 0.19; then
  ok "Ollama $v (>= 0.19: MLX backend available; see scripts/start-ollama-optimized.sh)"
else
  warn "Ollama $v is older than 0.19: it works, but without its MLX backend; upgrade for speed"
fi

if [ "$os" = "Linux" ] && [ "${TQSTACK_CUDA:-0}" != "1" ]; then
  if [ -n "$(tq_find_openblas)" ]; then ok "system OpenBLAS found (fast float32 on CPU)"
  else warn "no system OpenBLAS: MLX on CPU will be slow (install.sh adds it when run as root with apt)"; fi
fi

if [ "$fails" -gt 0 ]; then echo "preflight: $fails problem(s) block the install"; exit 1; fi
echo "preflight: ready"
