#!/usr/bin/env bash
# Cross-builds the board binary (release, no exporter) for armv7-unknown-linux-gnueabihf
# (32-bit Raspberry Pi OS, Cortex-A7/A53/A72 in 32-bit mode) and smoke-runs it under
# qemu-arm -cpu max. Installs Debian rustc-web + libstd-rust-web-dev:armhf,
# gcc-arm-linux-gnueabihf and qemu-user first; idempotent.
# Result: target/armv7-unknown-linux-gnueabihf/release/perceiver-edge
set -euo pipefail
cd "$(dirname "$0")/.."
. targets/cross-env.sh
cross_setup armv7
exec targets/smoke.sh "$TRIPLE" "$QEMU" "$@"
