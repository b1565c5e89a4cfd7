#!/usr/bin/env bash
# Keeps the shared build cache ($CARGO_TARGET_DIR, outside the clone) from filling the disk. Every change of
# a dependency or of a feature set leaves the old artifacts beside the new ones (one test binary is
# ~1.5 GB, the debug cache ~35-60 GB), and a full disk fails a build half-way with a compiler panic. With
# less than MIN_FREE_GB (30) free: incremental caches go, then executables not read for a day; with less than
# 15 GB still, libraries over 20 MB not read for a day too (those may cost a rebuild). Artifacts in use are
# read at every build, so with the usual relatime mounts their access times are recent. DRY_RUN=1 lists.
set -euo pipefail
target="${CARGO_TARGET_DIR:?set CARGO_TARGET_DIR}"
[ -d "$target" ] || exit 0
free_gb() { df -Pk "$target" | awk 'NR==2 {print int($4 / 1048576)}'; }
drop() {
  if [ "${DRY_RUN:-0}" = 1 ]; then xargs -0 -r ls -la; else xargs -0 -r rm -rf; fi
}
min="${MIN_FREE_GB:-30}"
[ "$(free_gb)" -lt "$min" ] || exit 0
echo "trim-target: $(free_gb) GB free under $target; removing stale build artifacts"
find "$target" -maxdepth 2 -type d -name incremental -print0 | drop
# Executables: no extension (test binaries, build scripts' outputs stay in build/).
for deps in "$target"/*/deps; do
  [ -d "$deps" ] || continue
  find "$deps" -maxdepth 1 -type f ! -name '*.*' -amin +1440 -print0 | drop
  if [ "$(free_gb)" -lt 15 ]; then
    find "$deps" -maxdepth 1 -type f -size +20M -amin +1440 -print0 | drop
  fi
done
echo "trim-target: $(free_gb) GB free"
