#!/usr/bin/env bash
# Export branches for one device call to profile them side by side (bench/gpu_notes.md):
# each branch's services/ and bench/ (results left out) go to .variants/<name>, which
# .git/info/exclude ignores and the device tool carries (`carry: [".variants", ...]`).
# On the GPU machine, after `bash bench/gpu_session.sh install` at the root:
#   (cd .variants/<name> && OUT=$OUT/<name> bash bench/gpu_session.sh ncu 131009 checks 0)
# (its own OUT, or its results overwrite the root's)
#
#   bash bench/export_variants.sh session7-centre-unverified session8-stack-unverified
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.variants/" .git/info/exclude || echo "/.variants/" >>.git/info/exclude
rm -rf .variants
for branch in "$@"; do
  name=${branch//\//-}
  mkdir -p ".variants/$name"
  git archive "$branch" services bench | tar -x -C ".variants/$name"
  rm -rf ".variants/$name/bench/results"
  echo ".variants/$name <- $branch ($(git rev-parse --short "$branch"))"
done
du -sh .variants
