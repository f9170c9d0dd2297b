#!/usr/bin/env bash
# The wheels (and their dependencies) (Python 3.12, manylinux x86-64) that the CUDA tests and
# the sidecar's modules import besides MLX, for the GPU machine (no package index there):
# pydantic and pydantic-settings (services.config), fastapi and starlette (the sidecar's
# app). Into .gpuwheels/ (git-ignored); `bash bench/gpu_session.sh install` installs them
# with MLX when the folder travels (carry: [".mlxcuda2", ".gpuwheels", ...]).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.gpuwheels/" .git/info/exclude 2>/dev/null || echo "/.gpuwheels/" >>.git/info/exclude
rm -rf .gpuwheels && mkdir -p .gpuwheels
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpuwheels \
  pydantic pydantic-settings fastapi sse-starlette httpx
du -sh .gpuwheels
