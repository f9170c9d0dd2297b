#!/usr/bin/env bash
# Print the KV-cache memory table (fp16 vs TurboQuant) for the configured sidecar model, as
# computed by services.hybrid_cache from the model's config.json (no weights are loaded).
#   bash scripts/kv-memory-table.sh [MODEL] [CONTEXTS]
#   MODEL: default SIDECAR_MODEL from config.env; embedded:<name>, a directory or a HF id
#   CONTEXTS: comma-separated token counts (default 8192,32768,131072)
# The TQ_* settings of config.env (bits, group size, boundary layers) are taken into account.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/common.sh
. "$here/lib/common.sh"
TQSTACK_HOME=$(tq_home)
export TQSTACK_HOME
py=""
for p in "$TQSTACK_HOME/venv/bin/python" "$here/../.venv/bin/python"; do
  if [ -x "$p" ]; then py=$p; break; fi
done
[ -n "$py" ] || tq_die "no tqstack virtualenv found: run install.sh first"
model_dir=$("$py" - "${1:-}" <<'PY'
import sys
from pathlib import Path

from services.config import load_settings
from services.models.embedded import resolve_model

s = load_settings()
spec = sys.argv[1] or s.sidecar_model
path = resolve_model(spec, s.resolved_models_dir)
if not Path(path).expanduser().is_dir():
    # A Hugging Face id: only its config.json is needed for the table.
    from huggingface_hub import snapshot_download

    path = snapshot_download(path, allow_patterns=["config.json"])
print(path)
PY
)
exec "$py" -m services.hybrid_cache --model "$model_dir" --contexts "${2:-8192,32768,131072}"
