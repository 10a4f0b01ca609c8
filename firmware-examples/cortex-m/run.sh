#!/usr/bin/env bash
# Builds the no_std PerceiverIO firmware for thumbv7em-none-eabihf and runs it on emulated
# Cortex-M4F (QEMU mps2-an386) and Cortex-M7 (mps2-an500) boards over semihosting.
#
#   1. host: perceiver-edge export models/digits --format pack (f32 or PACK_PRECISION=int8)
#   2. host: reference logits of every held-out digit with the tract engine (batch export)
#   3. cross-build (Debian rustc-web + rust-web-src, -Zbuild-std=core, ld.lld)
#   4. flash / RAM use from the linked ELF against the memory.x budget
#   5. qemu-system-arm on both boards: the firmware compares its logits with the host's and
#      exits non-zero on any class mismatch or logit out of tolerance
#
# Needs: apt-get install -y rustc-web rust-web-src lld qemu-system-arm (see targets notes).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=$root/target/cortex-m
mkdir -p "$out"
precision=${PACK_PRECISION:-f32}   # or int8

cargo build --release --quiet --workspace   # same feature set as CI's build: no extra tract build
bin=$(realpath -m "${CARGO_TARGET_DIR:-target}")/release/perceiver-edge   # CARGO_TARGET_DIR if set
$bin export models/digits --format pack --pack-precision "$precision" -o "$out/digits.pack"
n=$(python3 -c "import sys; h=open(sys.argv[1],'rb').read(128).decode('latin1'); print(h.split('shape\': (')[1].split(',')[0])" \
    models/digits/samples/heldout_inputs.npy)
$bin export models/digits --batch "$n" -o "$out/digits_b$n.onnx" > /dev/null
$bin run "$out/digits_b$n.onnx" --input models/digits/samples/heldout_inputs.npy --output "$out/expected_logits.npy" > /dev/null

cd firmware-examples/cortex-m
export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
export PERCEIVER_PACK=$out/digits.pack
export PERCEIVER_TEST_INPUTS=$root/models/digits/samples/heldout_inputs.npy
export PERCEIVER_EXPECTED=$out/expected_logits.npy
env -u CARGO_TARGET_DIR cargo build --release --quiet   # into .cargo/config.toml's target-dir ($out)
elf=$out/thumbv7em-none-eabihf/release/perceiver-cortex-m

# Memory use from the linked image: flash = code + read-only data + .data's load image,
# RAM = .data + .bss + .uninit (static; the stack grows down from the top of RAM).
size -A -d "$elf" | awk -v pack="$(stat -c %s "$out/digits.pack")" '
  $1 ~ /^\.(vector_table|text|rodata)$/ { flash += $2 }
  $1 == ".data" { flash += $2; ram += $2 }
  $1 ~ /^\.(bss|uninit)$/ { ram += $2 }
  END {
    printf "flash %d bytes (%.1f KiB of 1024 KiB, %.1f %%), of which weight pack %d bytes\n", flash, flash/1024, 100*flash/1048576, pack
    printf "RAM   %d bytes static (%.1f KiB of 192 KiB, %.1f %%): .data + .bss, the activation workspace; the stack comes on top\n", ram, ram/1024, 100*ram/196608
  }'
echo "(flash includes the test vectors: $n grey images + $n x 10 host logits = $(( n * 64 * 4 + n * 10 * 4 )) bytes)"

for board in "cortex-m4 mps2-an386" "cortex-m7 mps2-an500"; do
  set -- $board
  echo "== qemu-system-arm -cpu $1 -machine $2"
  timeout 600 qemu-system-arm -cpu "$1" -machine "$2" -nographic \
    -semihosting-config enable=on,target=native -kernel "$elf"
done
