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
