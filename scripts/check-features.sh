#!/usr/bin/env bash
# Prints every third-party crate whose features differ between the workspace build and the
# single-package builds CI makes (board CLI, CLI, Python package); exit 1 if any does. Each
# difference recompiles tract once more: add the crate's workspace features to
# engine/workspace-hack/Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
features() {
  cargo tree -e normal,build -f '{p} {f}' --prefix none "$@" | grep -v "($PWD" | sed 's/ (\*)$//' | sort -u
}
ws=$(features --workspace)
bad=0
for sel in "-p perceiver-edge --no-default-features" "-p perceiver-edge" "-p perceiver-edge -p perceiver-edge-python"; do
  # shellcheck disable=SC2086
  diff=$(comm -13 <(echo "$ws") <(features $sel) || true)
  if [ -n "$diff" ]; then
    echo "== $sel: features differ from the workspace's:"
    echo "$diff"
    bad=1
  fi
done
[ "$bad" = 0 ] && echo "features: every single-package build matches the workspace"
exit "$bad"
