#!/usr/bin/env bash
# Run the MLX sidecar in the foreground on SIDECAR_HOST:SIDECAR_PORT (127.0.0.1:8001).
# Settings come from config.env ($TQSTACK_CONFIG, else $TQSTACK_HOME/config.env) and the
# environment; with no SIDECAR_MODEL it serves the embedded SmolLM2-135M-Instruct,
# converted from its PyPI package on first use. Extra arguments go to tqstack-sidecar
# (--model, --host, --port, --config).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"

tq_launcher_env "$repo"
py=$TQ_PY
"$py" -c 'import services.sidecar, mlx_lm' 2>/dev/null \
  || tq_die "$py cannot import tqstack and mlx-lm (run install.sh, or pip install -e '$repo')"

# MLX on Linux CPU: a system OpenBLAS makes float32 matmuls ~10x faster (no-op elsewhere).
tq_preload_openblas
cd "$repo"
exec "$py" -m services.sidecar "$@"
