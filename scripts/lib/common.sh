# shellcheck shell=bash
# Helpers sourced by the scripts in scripts/ (not run on their own).

# Print the path of a system OpenBLAS worth preloading for MLX on Linux CPU, or nothing.
# MLX's Linux CPU wheel bundles a reference BLAS; a system OpenBLAS makes float32 ~80x faster.
tq_find_openblas() {
  [ "$(uname -s)" = "Linux" ] || return 0
  local c
  for c in /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
           /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 \
           /usr/lib64/libopenblasp.so.0 /usr/lib64/libopenblas.so.0 \
           /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
    if [ -r "$c" ]; then echo "$c"; return 0; fi
  done
}

# Export LD_PRELOAD with a system OpenBLAS when one exists (no-op elsewhere or when disabled).
tq_preload_openblas() {
  [ "${TQSTACK_NO_OPENBLAS:-0}" = "1" ] && return 0
  local lib
  lib=$(tq_find_openblas)
  if [ -n "$lib" ]; then
    case ":${LD_PRELOAD:-}:" in *":$lib:"*) ;; *) export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" ;; esac
  fi
}

# Install Debian's OpenBLAS when we are root on a Debian-like system and none is present.
tq_ensure_openblas() {
  [ "$(uname -s)" = "Linux" ] || return 0
  [ -n "$(tq_find_openblas)" ] && return 0
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "tqstack: installing libopenblas0-pthread (fast float32 matmul for MLX on CPU)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) \
      >/dev/null 2>&1 || echo "tqstack: could not install OpenBLAS; MLX will be slower" >&2
  fi
}

# Print the first python3 >= 3.10 on PATH, or nothing.
tq_find_python() {
  local p
  for p in "${TQSTACK_PYTHON:-}" python3.13 python3.12 python3.11 python3.10 python3; do
    [ -n "$p" ] || continue
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      command -v "$p"; return 0
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# Install and service helpers (install.sh, uninstall.sh, load-/unload-*.sh, preflight-check.sh)

tq_say() { printf 'tqstack: %s\n' "$*"; }
tq_warn() { printf 'tqstack: warning: %s\n' "$*" >&2; }
tq_die() { printf 'tqstack: error: %s\n' "$*" >&2; exit 1; }

# The install prefix (absolute, ~ expanded).
tq_home() {
  local h=${TQSTACK_HOME:-$HOME/ai/turboquant}
  # A literal ~ can come from config.env or a quoted variable: expand it here.
  # shellcheck disable=SC2088
  case "$h" in "~"|"~/"*) h="$HOME${h:1}" ;; esac
  printf '%s\n' "$h"
}

# Set up the environment of a foreground launcher (run-router.sh, run-sidecar.sh) and set
# TQ_PY to the interpreter to use: a checkout's .venv, then the installed virtualenv, then
# any python >= 3.10 (none: exit with an error). Exports TQSTACK_HOME, TQSTACK_CONFIG (when
# config.env exists) and PYTHONUNBUFFERED. Call it directly, not in $(...): the exports must
# reach the caller.
# shellcheck disable=SC2034  # TQ_PY is read by the launchers that source this file
tq_launcher_env() {
  local repo=$1 c
  TQSTACK_HOME=$(tq_home)
  export TQSTACK_HOME
  if [ -z "${TQSTACK_CONFIG:-}" ] && [ -f "$TQSTACK_HOME/config.env" ]; then
    export TQSTACK_CONFIG=$TQSTACK_HOME/config.env
  fi
  export PYTHONUNBUFFERED=1
  TQ_PY=""
  for c in "$repo/.venv/bin/python" "$TQSTACK_HOME/venv/bin/python"; do
    if [ -x "$c" ]; then TQ_PY=$c; return 0; fi
  done
  TQ_PY=$(tq_find_python)
  [ -n "$TQ_PY" ] || tq_die "no python >= 3.10 found (run install.sh)"
}

# Which service manager to use: launchd (macOS), systemd (a working user systemd), detached.
# TQSTACK_SERVICE_MODE=launchd|systemd|detached forces one (auto is the default).
tq_service_mode() {
  local mode=${TQSTACK_SERVICE_MODE:-auto}
  if [ "$mode" != "auto" ]; then printf '%s\n' "$mode"; return 0; fi
  if [ "$(uname -s)" = "Darwin" ]; then echo launchd; return 0; fi
  if command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
    echo systemd
  else
    echo detached
  fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
tq_port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Print the body of GET $1 when it answers 2xx within $2 seconds (default 2), else fail.
tq_http_get() {
  curl -fsS --max-time "${2:-2}" "$1" 2>/dev/null
}

# Poll URL $1 until it answers 2xx, for at most $2 seconds; $3 (optional) is a pid that must
# stay alive meanwhile. Returns 0 when ready.
tq_wait_http() {
  local url=$1 deadline=$(( $(date +%s) + ${2:-60} )) pid=${3:-}
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if tq_http_get "$url" >/dev/null; then return 0; fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 1
  done
  return 1
}

# True when pid $1 is alive and its command line mentions $2 (guards against reused pids).
tq_pid_matches() {
  local pid=$1 needle=$2 cmd
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  cmd=$(ps -ww -o args= -p "$pid" 2>/dev/null) || return 1
  case "$cmd" in *"$needle"*) return 0 ;; *) return 1 ;; esac
}

# Free disk space in MiB of the filesystem holding $1 (or its nearest existing parent).
tq_free_mb() {
  local d=$1
  while [ ! -e "$d" ] && [ "$d" != "/" ]; do d=$(dirname "$d"); done
  df -Pm "$d" | awk 'NR==2 {print $4}'
}

# True when version $1 >= version $2 (dotted numbers; a suffix such as -rc1 is ignored).
tq_version_ge() {
  local a=${1%%[-+ ]*} b=${2%%[-+ ]*}
  [ "$(printf '%s\n%s\n' "$b" "$a" | sort -t. -k1,1n -k2,2n -k3,3n | head -n1)" = "$b" ]
}

# Print the Ollama version found (server at $1 first, then the CLI), or nothing.
tq_ollama_version() {
  local url=${1:-http://127.0.0.1:11434} v=""
  v=$(tq_http_get "$url/api/version" | sed -n 's/.*"version" *: *"\([^"]*\)".*/\1/p') || true
  if [ -z "$v" ] && command -v ollama >/dev/null 2>&1; then
    v=$(ollama --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' | tail -n1) || true
  fi
  printf '%s' "$v"
}

# Like tq_wait_http, but give up early when log $3 (past byte $4) shows the service crashing:
# our supervisor's restart line (detached mode). Returns 0 when ready.
tq_wait_ready() {
  local url=$1 deadline=$(( $(date +%s) + ${2:-60} )) log=${3:-} offset=${4:-0}
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if tq_http_get "$url" >/dev/null; then return 0; fi
    if [ -n "$log" ] && [ -f "$log" ] \
       && tail -c +"$((offset + 1))" "$log" | grep -q 'exited with status'; then
      return 1
    fi
    sleep 1
  done
  return 1
}
