#!/usr/bin/env bash
# targets/smoke.sh TRIPLE "QEMU COMMAND" [cargo args]: used by build-aarch64.sh / build-armv7.sh
# (which set up the toolchain). Builds the board binary for TRIPLE, then under the emulator checks
# a profile, runs the bundled digits model (exported on the host) and compares the logits with
# the host build's.
set -euo pipefail
cd "$(dirname "$0")/.."
triple=$1 qemu=$2
shift 2
. targets/cross-env.sh
t0=$SECONDS
cargo build --release -p perceiver-edge --no-default-features --target "$triple" "$@"
echo "== cross build ($triple) took $((SECONDS - t0)) s"
bin=target/$triple/release/perceiver-edge
file "$bin" 2>/dev/null || true
ls -l "$bin"

# The host binary (with the exporter; the host toolchain, not rustc-web) makes the ONNX file and
# the reference output. Already built by the host test suite: this only re-links if needed.
# PERCEIVER_EDGE_HOST_BIN names another host build with the exporter instead.
host=${PERCEIVER_EDGE_HOST_BIN:-target/release/perceiver-edge}
[ -n "${PERCEIVER_EDGE_HOST_BIN:-}" ] || env -u RUSTC -u RUSTDOC cargo build --release -p perceiver-edge
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$host" export models/digits -o "$tmp/digits.onnx" >/dev/null
"$host" run "$tmp/digits.onnx" --input models/digits/samples/digit_3.npy --output "$tmp/host.npy" >/dev/null

t0=$SECONDS
$qemu "$bin" --version
$qemu "$bin" profile targets/raspberry-pi-5.toml
$qemu "$bin" inspect "$tmp/digits.onnx" | tail -4
$qemu "$bin" run "$tmp/digits.onnx" --input models/digits/samples/digit_3.npy --output "$tmp/emu.npy" --print
echo "== qemu smoke run took $((SECONDS - t0)) s"
# Same logits on the emulated board as on the host, to f32 rounding of different kernels.
python3 - "$tmp/host.npy" "$tmp/emu.npy" <<'PY'
import sys, struct
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<H", b[8:10])[0]
    return struct.unpack("<%df" % ((len(b) - 10 - n) // 4), b[10 + n:])
h, e = load(sys.argv[1]), load(sys.argv[2])
worst = max(abs(a - b) for a, b in zip(h, e))
print("host vs emulated logits: max |diff| %.2e over %d values" % (worst, len(h)))
assert len(h) == len(e) and worst <= 1e-4 + 1e-5 * max(abs(x) for x in h), "emulated run differs"
PY
