#!/usr/bin/env bash
# Cross-builds the board binary (release, no exporter: run / bench / inspect / profile) for
# aarch64-unknown-linux-gnu (Raspberry Pi 4/5, Jetson CPUs) and smoke-runs it under
# qemu-aarch64 -cpu max on the bundled digits model. Installs its toolchain first (Debian
# rustc-web + libstd-rust-web-dev:arm64, gcc-aarch64-linux-gnu, qemu-user); idempotent.
#   targets/build-aarch64.sh [extra cargo args, e.g. --features cuda]
# Result: target/aarch64-unknown-linux-gnu/release/perceiver-edge
set -euo pipefail
cd "$(dirname "$0")/.."
. targets/cross-env.sh
cross_setup aarch64
exec targets/smoke.sh "$TRIPLE" "$QEMU" "$@"
