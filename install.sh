#!/usr/bin/env bash
# Install (or upgrade) tqstack into $TQSTACK_HOME and start it in the background.
#
#   bash install.sh [--no-services]
#
# Safe to re-run: it upgrades the code from this checkout, merges config.env (your edits are
# kept), restarts the services and waits until they answer. Settings for the install itself:
#   TQSTACK_HOME          install prefix (default ~/ai/turboquant)
#   TQSTACK_SERVICE_MODE  auto|launchd|systemd|detached (default auto)
#   TQSTACK_CUDA=1        MLX with CUDA (NVIDIA) instead of the CPU build on Linux
#   TQSTACK_PIP_ARGS      extra arguments for pip (for example --no-index --find-links DIR)
#   TQSTACK_WAIT_S        how long to wait for the services to become ready (default 600)
# Any config.env key set in the environment (ROUTER_PORT, SIDECAR_MODEL, MODELS_DIR, ...) is
# written into config.env.
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$src/scripts/lib/common.sh"
# shellcheck source=scripts/lib/services.sh
. "$src/scripts/lib/services.sh"

start_services=1
for arg in "$@"; do
  case "$arg" in
    --no-services) start_services=0 ;;
    -h|--help) sed -n '2,14p' "$0" | cut -c3-; exit 0 ;;
    *) tq_die "unknown argument $arg (see --help)" ;;
  esac
done

TQSTACK_HOME=$(tq_home)
export TQSTACK_HOME
changed=()  # what this run changed, for the summary

echo "== tqstack install into $TQSTACK_HOME"
bash "$src/scripts/preflight-check.sh" || tq_die "preflight failed (see above)"
if [ "$(uname -s)" = "Linux" ] && [ "${TQSTACK_CUDA:-0}" != "1" ]; then
  tq_ensure_openblas || true  # a speed-up only: never fatal
fi

py=$(tq_find_python)
mkdir -p "$TQSTACK_HOME"
# The code and helpers are copied into the install, so it keeps working without this checkout.
echo "== copying the application into $TQSTACK_HOME/app"
app_new=$TQSTACK_HOME/app.new
rm -rf "$app_new"
mkdir -p "$app_new/docs"
(cd "$src" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md \
  install.sh uninstall.sh services scripts launchagents open-webui) | tar -C "$app_new" -xf -
cp "$src/docs/config.env.example" "$app_new/docs/"
rm -rf "$TQSTACK_HOME/app"
mv "$app_new" "$TQSTACK_HOME/app"
changed+=("$TQSTACK_HOME/app: application files (replaced)")

venv=$TQSTACK_HOME/venv
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "== upgrading the virtualenv $venv"
else
  echo "== creating the virtualenv $venv (python: $py)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  changed+=("$venv: new virtualenv")
fi
target=$TQSTACK_HOME/app
if [ "${TQSTACK_CUDA:-0}" = "1" ]; then target="${target}[cuda]"; fi
echo "== installing tqstack and MLX into the virtualenv (a few minutes the first time)"
# shellcheck disable=SC2086  # TQSTACK_PIP_ARGS is a list of words on purpose
"$venv/bin/python" -m pip install -q --disable-pip-version-check ${TQSTACK_PIP_ARGS:-} "$target" \
  || tq_die "pip install failed (see above); re-run install.sh when fixed"
if [ "${TQSTACK_CUDA:-0}" = "1" ]; then
  # mlx-cpu (a Linux base dependency) and mlx-cuda-13 both ship mlx/lib/libmlx.so: install
  # the CUDA one last so its library is the one on disk.
  mlxv=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("mlx"))')
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check ${TQSTACK_PIP_ARGS:-} \
    --force-reinstall --no-deps "mlx-cuda-13==$mlxv" \
    || tq_die "could not install mlx-cuda-13==$mlxv (TQSTACK_CUDA=1)"
fi
# From $TQSTACK_HOME: in the checkout, `import services` would find the source tree instead.
(cd "$TQSTACK_HOME" && "$venv/bin/python" -c 'import mlx.core, mlx_lm, services.router, services.sidecar') \
  || tq_die "the virtualenv cannot import MLX or tqstack"
changed+=("$venv: tqstack $("$venv/bin/python" -c 'from importlib.metadata import version; print(version("tqstack"))') with $("$venv/bin/python" -c 'import mlx.core as mx; print("mlx", mx.__version__, mx.default_device())')")

# Small wrappers that pin this install's home and config (a bare symlink would read the default).
mkdir -p "$TQSTACK_HOME/bin"
for tool in tqstack-status tqstack-model; do
  rm -f "$TQSTACK_HOME/bin/$tool"
  printf '#!/bin/sh\n# %s of the tqstack install at %s (written by install.sh)\nTQSTACK_HOME=%q TQSTACK_CONFIG=%q exec %q "$@"\n' \
    "$tool" "$TQSTACK_HOME" "$TQSTACK_HOME" "${TQSTACK_CONFIG:-$TQSTACK_HOME/config.env}" "$venv/bin/$tool" \
    >"$TQSTACK_HOME/bin/$tool"
  chmod +x "$TQSTACK_HOME/bin/$tool"
done

tq_svc_init
echo "== writing $TQ_CONFIG"
existed=0
[ -f "$TQ_CONFIG" ] && existed=1
"$TQ_PY" "$TQ_LIB/configenv.py" merge --template "$TQ_TEMPLATE" --config "$TQ_CONFIG" --from-env
if [ "$existed" = 1 ]; then changed+=("$TQ_CONFIG: merged (your values kept)")
else changed+=("$TQ_CONFIG: created"); fi

decision=$(tq_sidecar_decision)
model=$(tq_cfg SIDECAR_MODEL)
models_dir=$(tq_cfg MODELS_DIR)
[ -n "$models_dir" ] || models_dir=$TQSTACK_HOME/models
echo "== sidecar: $([ "${decision%% *}" = 1 ] && echo enabled || echo disabled) (${decision#* }); model $model"
if [ "${decision%% *}" = 1 ]; then
  case "$model" in
    embedded:*)
      echo "== obtaining the model ${model#embedded:} into $models_dir"
      "$venv/bin/tqstack-model" fetch "${model#embedded:}" --models-dir "$models_dir" \
        || tq_die "could not obtain $model"
      changed+=("$models_dir/${model#embedded:}: model ready") ;;
    /*|~*|./*)
      [ -d "${model/#\~/$HOME}" ] || tq_die "SIDECAR_MODEL=$model is not a directory" ;;
    *)
      echo "== downloading $model from the Hugging Face hub"
      "$venv/bin/python" -c 'import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))' "$model" \
        || tq_warn "could not download $model now; the sidecar will try again when it starts" ;;
  esac
fi

ollama_url=$(tq_cfg OLLAMA_URL)
ollama_v=$(tq_ollama_version "$ollama_url")
if [ -n "$ollama_v" ]; then
  ollama_note="Ollama $ollama_v at $ollama_url (short prompts go there; model $(tq_cfg OLLAMA_MODEL))"
  tq_version_ge "$ollama_v" 0.19 || ollama_note="$ollama_note; older than 0.19: upgrade for its MLX backend"
else
  ollama_note="Ollama not found: every request is served by the sidecar"
fi

router_port=$(tq_cfg ROUTER_PORT)
sidecar_port=$(tq_cfg SIDECAR_PORT)
if [ "$start_services" = 1 ]; then
  mode=$(tq_service_mode)
  echo "== starting the services ($mode)"
  tq_services_stop_all
  for port in "$router_port" "$sidecar_port"; do
    for _ in $(seq 1 20); do tq_port_busy "$port" || break; sleep 0.5; done
    tq_port_busy "$port" && tq_die "port $port is still in use by another program; set ROUTER_PORT/SIDECAR_PORT in $TQ_CONFIG"
  done
  # Remember where the sidecar log ends, to spot a crash of this start (not an old one).
  log_offset=$(wc -c <"$(tq_log_dir "$mode")/tqstack-sidecar.log" 2>/dev/null || echo 0)
  tq_services_start "$mode"
  changed+=("services: $mode ($(case "$mode" in
    detached) echo "pid files in $TQ_RUN, logs in $(tq_log_dir detached)" ;;
    systemd) echo "units in $TQ_SYSTEMD_DIR, logs in $(tq_log_dir systemd); 'loginctl enable-linger ${USER:-$(id -un)}' keeps them running after logout" ;;
    launchd) echo "agents in $TQ_AGENTS_DIR, logs in ~/Library/Logs" ;; esac))")

  wait_s=${TQSTACK_WAIT_S:-600}
  if [ "${decision%% *}" = 1 ]; then
    echo "== waiting for the sidecar to load its model (up to ${wait_s}s)"
    sidecar_log=$(tq_log_dir "$mode")/tqstack-sidecar.log
    # launchd keeps stderr (where Python logs) in its own file.
    [ "$mode" = launchd ] && sidecar_log=$(tq_log_dir "$mode")/tqstack-sidecar.err.log
    if ! tq_wait_ready "http://127.0.0.1:$sidecar_port/health" "$wait_s" "$sidecar_log" "$log_offset"; then
      echo "---- last lines of $sidecar_log"
      tail -n 30 "$sidecar_log" 2>/dev/null || true
      tq_die "the sidecar did not become ready (log: $sidecar_log)"
    fi
  fi
  echo "== waiting for the router on :$router_port"
  # Any answer will do here (503 only means no backend is up yet); the sidecar is checked below.
  for _ in $(seq 1 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$router_port/health")" != 000 ] && break
    sleep 1
  done
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$router_port/health")" != 000 ] \
    || tq_die "the router did not become ready; see its log ($(tq_log_dir "$mode")/tqstack-router.log)"
  if [ "${decision%% *}" = 1 ]; then
    # The router learns about the sidecar from its own health checks: give it a few rounds.
    ready=0
    for _ in $(seq 1 30); do
      if tq_http_get "http://127.0.0.1:$router_port/health" | grep -q '"sidecar_available" *: *true'; then
        ready=1; break
      fi
      sleep 1
    done
    [ "$ready" = 1 ] || tq_warn "the router does not see the sidecar yet; check: $TQSTACK_HOME/bin/tqstack-status"
  fi
fi

cat <<EOF

== tqstack is installed.
What changed:
$(printf '  - %s\n' "${changed[@]}")
Backends:
  - sidecar: $([ "${decision%% *}" = 1 ] && echo "on :$sidecar_port with $model" || echo "off (${decision#* })")
  - $ollama_note

Try it:
  curl -s http://127.0.0.1:$router_port/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"tq:auto","messages":[{"role":"user","content":"What is the capital of France?"}]}'

Status:     $TQSTACK_HOME/bin/tqstack-status
Config:     $TQ_CONFIG (then: bash $TQSTACK_HOME/app/scripts/load-services.sh)
Uninstall:  bash $TQSTACK_HOME/app/uninstall.sh   (keeps config.env and models; --purge removes them)
EOF
if [ -n "$ollama_v" ]; then
  echo "Ollama:     bash $TQSTACK_HOME/app/scripts/start-ollama-optimized.sh  (OLLAMA_MLX=1, flash attention)"
fi
