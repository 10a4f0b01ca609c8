#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU, in one go (targets/README.md, "GPU path, tract"):
# every fixture on `--device cuda` against transformers (f32) and against the same binary on the
# CPU (f16, int8, q4), then `models/reference/gpu_bench.py` (bench model and published
# architectures, CPU vs GPU latency, load time, memory, fidelity).
#
#   targets/check-gpu.sh BIN [OUT_DIR]
#
# gpu_bench.py runs twice: the bench model in every precision at 1 and all CPU threads, then the
# published architectures in $GPU_MODELS (default vision-fourier) in f32 and q4 against all CPU
# threads only (one round of 5 runs: a run takes seconds on one core).
#
# BIN: a perceiver-edge built with the exporter and `--features cuda-13` (or `cuda`). Needs Python 3
# with numpy (fixtures), plus torch and transformers (gpu_bench.py generates the checkpoints).
# The CUDA libraries' folders (driver, cudart, cublas, nvrtc, cudnn, curand: system or pip's
# nvidia-* packages) are put in LD_LIBRARY_PATH. Logs and gpu_bench's JSON go to OUT_DIR
# (default: a new temporary folder).
set -uo pipefail
[ $# -ge 1 ] && [ -x "$1" ] || { echo "error: usage: targets/check-gpu.sh BIN [OUT_DIR] (BIN: an executable perceiver-edge)" >&2; exit 1; }
bin=$(realpath "$1")
out=${2:-$(mktemp -d -t pe-gpu-check.XXXXXX)}
mkdir -p "$out" && out=$(realpath "$out") || exit 1
echo "logs in $out"
cd "$(dirname "$0")/.."
py=${PERCEIVER_EDGE_PYTHON:-python3}

roots=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu)
roots+=($("$py" -c 'import site; print(" ".join(p + "/nvidia" for p in site.getsitepackages()))' 2>/dev/null))
dirs=$(find "${roots[@]}" -maxdepth 3 \( -name 'libcuda.so*' -o -name 'libcudart.so*' -o -name 'libcublas*.so*' \
  -o -name 'libnvrtc*.so*' -o -name 'libcudnn*.so*' -o -name 'libcurand*.so*' \) -not -path '*/stubs/*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi: a Jetson has none)"

status=0
# Fixtures: the four precisions side by side (each process runs its cases one after another).
for p in f32 f16 int8 q4; do
  flags=(); [ "$p" != f32 ] && flags=(--precision "$p" --reference-bin "$bin")
  "$py" models/reference/check_device.py --bin "$bin" --device cuda "${flags[@]}" > "$out/fixtures-$p.log" 2>&1 &
done
for p in f32 f16 int8 q4; do
  wait -n || status=1
done
for p in f32 f16 int8 q4; do
  echo "== fixtures $p: $(tail -1 "$out/fixtures-$p.log")"
  grep -E "^(FAIL|ERROR)" "$out/fixtures-$p.log" | head -5
done

if grep -q "^0 outputs passed" "$out/fixtures-f32.log"; then
  echo "error: no fixture ran on --device cuda (the first lines of $out/fixtures-f32.log say why); not timing" >&2
  exit 1
fi
work=$(mktemp -d)   # checkpoints and exports (about 1 GB with vision-fourier): removed at exit
trap 'rm -rf "$work"' EXIT
echo "== gpu_bench.py: bench model (work folder $work)"
PYTHONUNBUFFERED=1 "$py" models/reference/gpu_bench.py --bin "$bin" --work "$work" --models bench \
  --json "$out/gpu_bench-bench.json" 2>&1 | tee "$out/gpu_bench-bench.log" || status=1
echo "== gpu_bench.py: ${GPU_MODELS:=vision-fourier}"
PYTHONUNBUFFERED=1 "$py" models/reference/gpu_bench.py --bin "$bin" --work "$work" --models "$GPU_MODELS" \
  --precisions f32,q4 --threads all --rounds 1 --runs 5 --warmup 1 \
  --json "$out/gpu_bench-published.json" 2>&1 | tee "$out/gpu_bench-published.log" || status=1
exit $status
