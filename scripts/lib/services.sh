# shellcheck shell=bash
# Background services of an installed tqstack: launchd agents (macOS), systemd --user units,
# or detached processes with pid files. Sourced by load-/unload-*.sh, install.sh, uninstall.sh
# after scripts/lib/common.sh. Everything acts on the install at $TQSTACK_HOME only.

# Set the TQ_* variables describing the install this shell acts on.
tq_svc_init() {
  TQ_HOME=$(tq_home)
  TQ_APP=$TQ_HOME/app
  TQ_CONFIG=${TQSTACK_CONFIG:-$TQ_HOME/config.env}
  TQ_RUN=$TQ_HOME/run
  TQ_NAME=${TQSTACK_SERVICE_NAME:-tqstack}
  TQ_SYSTEMD_DIR=${TQSTACK_SYSTEMD_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user}
  TQ_AGENTS_DIR=${TQSTACK_LAUNCHAGENTS_DIR:-$HOME/Library/LaunchAgents}
  if [ -x "$TQ_HOME/venv/bin/python" ]; then TQ_PY=$TQ_HOME/venv/bin/python; else TQ_PY=$(tq_find_python); fi
  [ -n "$TQ_PY" ] || tq_die "python >= 3.10 is required"
  TQ_LIB=$TQ_APP/scripts/lib
  [ -f "$TQ_LIB/configenv.py" ] || TQ_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  TQ_TEMPLATE=$TQ_APP/docs/config.env.example
  [ -f "$TQ_TEMPLATE" ] || TQ_TEMPLATE=$TQ_LIB/../../docs/config.env.example
}

# Where service logs go for a given mode.
tq_log_dir() {
  if [ "$1" = "launchd" ]; then echo "$HOME/Library/Logs"; else echo "$TQ_HOME/logs"; fi
}

# One key of the installed config.env (the documented default when the file lacks it).
tq_cfg() {
  "$TQ_PY" "$TQ_LIB/configenv.py" get --template "$TQ_TEMPLATE" --config "$TQ_CONFIG" "$1"
}

# Print "1 reason" or "0 reason": should the sidecar service run on this machine?
tq_sidecar_decision() {
  local v models
  v=$(tq_cfg SIDECAR_ENABLED)
  case "$v" in
    1|true|yes|on) echo "1 SIDECAR_ENABLED=$v" ;;
    0|false|no|off) echo "0 SIDECAR_ENABLED=$v" ;;
    *)
      models=$(tq_cfg MODELS_DIR)
      [ -n "$models" ] || models=$TQ_HOME/models
      "$TQ_PY" "$TQ_LIB/sysinfo.py" sidecar-auto "$(tq_cfg SIDECAR_MODEL)" "$models" ;;
  esac
}

# --- detached processes -----------------------------------------------------------------------

tq_detached_pid() { cat "$TQ_RUN/$1.pid" 2>/dev/null || true; }
tq_detached_needle() { echo "$TQ_APP/scripts/tqstack-service.sh"; }

# Start service $1 detached from the terminal, supervised (restarted if it crashes).
tq_detached_start() {
  local svc=$1 log_dir pid k
  log_dir=$(tq_log_dir detached)
  mkdir -p "$TQ_RUN" "$log_dir"
  # config.env is the single source of truth, as for launchd/systemd: drop inherited overrides.
  local unset_args=()
  # shellcheck disable=SC2013  # keys are single words
  for k in $(sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' "$TQ_TEMPLATE"); do unset_args+=(-u "$k"); done
  local launcher=(nohup env "${unset_args[@]}" "TQSTACK_HOME=$TQ_HOME" "TQSTACK_CONFIG=$TQ_CONFIG")
  # The router is told the resolved SIDECAR_ENABLED, as the launchd/systemd templates do.
  if [ "$svc" = "router" ]; then launcher+=("SIDECAR_ENABLED=${TQ_SIDECAR_ON:-1}"); fi
  launcher+=(/bin/bash "$(tq_detached_needle)" --supervise "$svc")
  # setsid: its own session and process group, so the whole tree stops together.
  if command -v setsid >/dev/null 2>&1; then
    setsid "${launcher[@]}" >>"$log_dir/tqstack-$svc.log" 2>&1 </dev/null &
  else
    "${launcher[@]}" >>"$log_dir/tqstack-$svc.log" 2>&1 </dev/null &
  fi
  pid=$!
  echo "$pid" >"$TQ_RUN/$svc.pid"
  sleep 0.5
  tq_pid_matches "$pid" "$(tq_detached_needle)" || tq_die "$svc did not start; see $log_dir/tqstack-$svc.log"
  tq_say "started $svc (detached, pid $pid, log $log_dir/tqstack-$svc.log)"
}

# Stop detached service $1 if its pid file names a live process of ours.
tq_detached_stop() {
  local svc=$1 pid
  pid=$(tq_detached_pid "$svc")
  [ -n "$pid" ] || return 0
  if tq_pid_matches "$pid" "$(tq_detached_needle)"; then
    # Signal the process group when the supervisor leads one (setsid), else the supervisor.
    if [ "$(ps -o pgid= -p "$pid" | tr -d ' ')" = "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true
    else kill -TERM "$pid" 2>/dev/null || true; fi
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      tq_warn "$svc (pid $pid) ignored TERM for 20 s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    tq_say "stopped $svc (detached, pid $pid)"
  fi
  rm -f "$TQ_RUN/$svc.pid"
}

# --- systemd --user -----------------------------------------------------------------------------

tq_unit_file() { echo "$TQ_SYSTEMD_DIR/$TQ_NAME-$1.service"; }

# Render and validate the unit of service $1 into the user unit directory.
tq_systemd_render() {
  local svc=$1 dst
  dst=$(tq_unit_file "$svc")
  "$TQ_PY" "$TQ_LIB/render.py" "$TQ_APP/launchagents/systemd/tqstack-$svc.service.template" "$dst" \
    "UNIT=$(basename "$dst")" "APP_DIR=$TQ_APP" "TQSTACK_HOME=$TQ_HOME" "CONFIG=$TQ_CONFIG" \
    "LOG_DIR=$(tq_log_dir systemd)" "SIDECAR_ENABLED=${TQ_SIDECAR_ON:-1}" || tq_die "could not render $dst"
  if command -v systemd-analyze >/dev/null 2>&1; then
    # System mode: --user verify needs a running user manager, the syntax check does not.
    systemd-analyze verify "$dst" >/dev/null 2>&1 || tq_warn "systemd-analyze verify flagged $dst"
  fi
}

tq_systemd_start() {
  local svc=$1
  mkdir -p "$(tq_log_dir systemd)"
  tq_systemd_render "$svc"
  systemctl --user daemon-reload
  systemctl --user enable "$TQ_NAME-$svc.service" >/dev/null 2>&1
  systemctl --user restart "$TQ_NAME-$svc.service"
  tq_say "started $svc (systemd --user unit $(tq_unit_file "$svc"), log $(tq_log_dir systemd)/tqstack-$svc.log)"
}

# Stop, disable and remove the unit of service $1 if it belongs to this install.
tq_systemd_stop() {
  local svc=$1 f
  f=$(tq_unit_file "$svc")
  [ -f "$f" ] && grep -qF "$TQ_HOME" "$f" || return 0
  systemctl --user disable --now "$TQ_NAME-$svc.service" >/dev/null 2>&1 || true
  rm -f "$f"
  systemctl --user daemon-reload >/dev/null 2>&1 || true
  tq_say "removed systemd unit $f"
}

# --- launchd (macOS) ------------------------------------------------------------------------------

tq_label() { echo "com.$TQ_NAME-$1"; }
tq_plist_file() { echo "$TQ_AGENTS_DIR/$(tq_label "$1").plist"; }

tq_launchd_render() {
  local svc=$1 dst
  dst=$(tq_plist_file "$svc")
  "$TQ_PY" "$TQ_LIB/render.py" "$TQ_APP/launchagents/com.tqstack-$svc.plist.template" "$dst" \
    "LABEL=$(tq_label "$svc")" "APP_DIR=$TQ_APP" "TQSTACK_HOME=$TQ_HOME" "CONFIG=$TQ_CONFIG" \
    "LOG_DIR=$(tq_log_dir launchd)" "SIDECAR_ENABLED=${TQ_SIDECAR_ON:-1}" || tq_die "could not render $dst"
  if command -v plutil >/dev/null 2>&1; then plutil -lint "$dst" >/dev/null || tq_die "plutil rejected $dst"; fi
}

tq_launchd_start() {
  local svc=$1 dst
  dst=$(tq_plist_file "$svc")
  mkdir -p "$(tq_log_dir launchd)" "$TQ_AGENTS_DIR"
  tq_launchd_render "$svc"
  launchctl bootout "gui/$(id -u)/$(tq_label "$svc")" >/dev/null 2>&1 || true
  launchctl bootstrap "gui/$(id -u)" "$dst" 2>/dev/null || launchctl load -w "$dst"
  tq_say "started $svc (launchd agent $dst, log ~/Library/Logs/tqstack-$svc.log)"
}

tq_launchd_stop() {
  local svc=$1 f
  f=$(tq_plist_file "$svc")
  [ -f "$f" ] && grep -qF "$TQ_HOME" "$f" || return 0
  launchctl bootout "gui/$(id -u)/$(tq_label "$svc")" >/dev/null 2>&1 || launchctl unload -w "$f" >/dev/null 2>&1 || true
  rm -f "$f"
  tq_say "removed launchd agent $f"
}

# --- all modes ----------------------------------------------------------------------------------

# Stop every service of this install, whatever manager started it (safe to repeat).
tq_services_stop_all() {
  local svc
  for svc in router sidecar; do
    tq_detached_stop "$svc"
    tq_systemd_stop "$svc"
    tq_launchd_stop "$svc"
  done
  rm -f "$TQ_RUN/service-mode"
}

# (Re)start router and, when wanted, the sidecar with the chosen manager.
tq_services_start() {
  local mode=$1 decision svc
  decision=$(tq_sidecar_decision)
  local services=(router)
  TQ_SIDECAR_ON=${decision%% *}
  if [ "$TQ_SIDECAR_ON" = "1" ]; then services=(sidecar router)
  else tq_say "sidecar not started: ${decision#* } (set SIDECAR_ENABLED=1 in $TQ_CONFIG to force it)"; fi
  mkdir -p "$TQ_RUN"
  echo "$mode" >"$TQ_RUN/service-mode"
  for svc in "${services[@]}"; do
    case "$mode" in
      detached) tq_detached_start "$svc" ;;
      systemd) tq_systemd_start "$svc" ;;
      launchd) tq_launchd_start "$svc" ;;
      *) tq_die "unknown service mode '$mode' (launchd, systemd or detached)" ;;
    esac
  done
}
