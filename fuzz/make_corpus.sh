#!/usr/bin/env bash
# Rebuilds the committed seed corpus fuzz/corpus/<target>/ (run from anywhere; needs the CLI
# built: cargo build --release --workspace, and a Python with numpy and onnx, e.g. the .venv
# that scripts/test.sh makes). Deterministic; every seed is small (the whole corpus < 1 MB).
#
#   export_checkpoint  flags byte + u32 LE config length + config.json + model.safetensors:
#                      tiny shrunk checkpoints (fuzz/make_seeds.py), three small fixtures as they
#                      are, and every fixture's config.json with an empty safetensors
#   npy_inputs         small fixture .npy files and hand-made ones (dtypes, orders, v2 header)
#   onnx_load_run      tiny exports (f32, int8, no rewrites, bare) and hand-made graphs
#   board_profile      targets/*.toml
#   pack_reader        f32 and int8 packs of the tiny image_fourier checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${PERCEIVER_EDGE_BIN:-$root/target/release/perceiver-edge}
py=${PYTHON:-$root/.venv/bin/python}
fix=models/reference/fixtures
c=fuzz/corpus
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$c"
mkdir -p "$c"/{export_checkpoint,npy_inputs,onnx_load_run,board_profile,pack_reader}

python3 fuzz/make_seeds.py "$tmp/tiny"
tiny_if=$tmp/tiny/image_fourier
tiny_bl=$tmp/tiny/bare_latents

# export_checkpoint: FLAGS (see engine/fuzz-targets/src/lib.rs, mod flags) CONFIG SAFETENSORS
ckpt() { # NAME FLAGS CONFIG SAFETENSORS
  python3 - "$c/export_checkpoint/$1" "$2" "$3" "$4" <<'PY'
import struct, sys
out, flags, cfg, st = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "rb").read(), open(sys.argv[4], "rb").read()
open(out, "wb").write(bytes([flags]) + struct.pack("<I", len(cfg)) + cfg + st)
PY
}
printf '\x08\x00\x00\x00\x00\x00\x00\x00{}' > "$tmp/empty.safetensors"
ckpt tiny_image_fourier 0 "$tiny_if/config.json" "$tiny_if/model.safetensors"
ckpt tiny_image_fourier_packs 24 "$tiny_if/config.json" "$tiny_if/model.safetensors"
ckpt tiny_image_fourier_norewrite_b2 38 "$tiny_if/config.json" "$tiny_if/model.safetensors"
ckpt tiny_bare_latents 1 "$tiny_bl/config.json" "$tiny_bl/model.safetensors"
ckpt tiny_image_fourier_int8 64 "$tiny_if/config.json" "$tiny_if/model.safetensors"
ckpt tiny_bare_latents_q4 129 "$tiny_bl/config.json" "$tiny_bl/model.safetensors"
ckpt bare_latents 1 "$fix/bare_latents/config.json" "$fix/bare_latents/model.safetensors"
ckpt bare_trainable 1 "$fix/bare_trainable/config.json" "$fix/bare_trainable/model.safetensors"
ckpt image_fourier 0 "$fix/image_fourier/config.json" "$fix/image_fourier/model.safetensors"
ckpt image_fourier_q4 128 "$fix/image_fourier/config.json" "$fix/image_fourier/model.safetensors"
for d in "$fix"/*/; do
  n=$(basename "$d")
  ckpt "config_only_$n" 1 "$d/config.json" "$tmp/empty.safetensors"
done

# npy_inputs
for f in image_fourier/b1.in.pixel_values.npy bare_latents/default.in.inputs.npy mlm/subset.in.output_indices.npy \
         seqcls/default.out.logits.npy; do
  cp "$fix/$f" "$c/npy_inputs/$(echo "$f" | tr / _)"
done
"$py" - "$c/npy_inputs" <<'PY'
import io, sys, numpy as np
out = sys.argv[1]
def save(name, a, **kw):
    np.save(f"{out}/{name}.npy", a, **kw)
save("f32_1x3x2x2", np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2) / 12)
save("f32_stack_2x3x2x2", np.ones((2, 3, 2, 2), np.float32))
save("i64_2x4", np.arange(8, dtype=np.int64).reshape(2, 4))
save("i32_2x4", np.arange(8, dtype=np.int32).reshape(2, 4))
save("f64_scalar", np.float64(3.5))
save("u8_3", np.array([1, 2, 3], np.uint8))
save("i8_3", np.array([-1, 0, 1], np.int8))
save("bool_2", np.array([True, False]))
save("f32_empty_0x3x2x2", np.zeros((0, 3, 2, 2), np.float32))
save("f32_big_endian", np.ones((1, 3, 2, 2), ">f4"))
save("f32_fortran", np.asfortranarray(np.ones((3, 2), np.float32)))
save("f16_2", np.ones(2, np.float16))
b = io.BytesIO()
np.lib.format.write_array(b, np.ones((1, 3, 2, 2), np.float32), version=(2, 0))
open(f"{out}/f32_v2_header.npy", "wb").write(b.getvalue())
PY

# onnx_load_run
"$bin" export "$tiny_if" -o "$c/onnx_load_run/tiny_image_fourier.onnx" > /dev/null
"$bin" export "$tiny_if" --no-rewrites -o "$c/onnx_load_run/tiny_image_fourier_norewrite.onnx" > /dev/null
"$bin" export "$tiny_if" --precision int8 -o "$c/onnx_load_run/tiny_image_fourier_int8.onnx" > /dev/null
"$bin" export "$tiny_bl" --seq-len 3 -o "$c/onnx_load_run/tiny_bare_latents.onnx" > /dev/null
"$bin" export "$tiny_if" --precision f16 -o "$c/onnx_load_run/tiny_image_fourier_f16.onnx" > /dev/null
"$bin" export "$tiny_if" --precision q4 -o "$c/onnx_load_run/tiny_image_fourier_q4.onnx" > /dev/null
# A latent block applied twice whose 4-bit products repeat (the loader replays their translation).
"$bin" export "$fix/image_fourier" --precision q4 -o "$c/onnx_load_run/image_fourier_q4_repeats.onnx" > /dev/null
# Random graphs of the blocks the runtime fuses, chained as exports never chain them
# (models/reference/graph_fuzz.py): the first graph holding each block.
"$py" - "$c/onnx_load_run" <<'PY'
import sys
sys.path.insert(0, "models/reference")
import onnx
import graph_fuzz
wanted = {"attention": {"Softmax", "Transpose", "Reshape"}, "int8": {"MatMulInteger"}, "f16": {"Cast", "MatMul"},
          "dequantized": {"DequantizeLinear"}, "layer_norm": {"LayerNormalization"}, "erf": {"Erf"},
          "concat": {"Concat"}, "slice": {"Slice"}, "q4": {"MatMulNBits"}}
for name, ops in wanted.items():
    for seed in range(1000):
        model = graph_fuzz.graph(seed)[0]
        have = {n.op_type for n in model.graph.node}
        if ops <= have and len(model.SerializeToString()) < 16 << 10:
            onnx.save(model, f"{sys.argv[1]}/graph_fuzz_{name}_{seed}.onnx")
            break
PY
"$py" - "$c/onnx_load_run" <<'PY'
import sys, numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh
out = sys.argv[1]
def save(name, nodes, inputs, outputs, inits=(), meta=None):
    g = h.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], producer_name="fuzz-seed")
    m.ir_version = 8
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, f"{out}/{name}.onnx")
vi = h.make_tensor_value_info
save("add", [h.make_node("Add", ["a", "b"], ["y"])],
     [vi("a", T.FLOAT, [1, 4]), vi("b", T.FLOAT, [1, 4])], [vi("y", T.FLOAT, [1, 4])])
save("matmul_softmax", [h.make_node("MatMul", ["x", "w"], ["m"]), h.make_node("Softmax", ["m"], ["y"], axis=-1)],
     [vi("x", T.FLOAT, [2, 3])], [vi("y", T.FLOAT, [2, 2])],
     [nh.from_array(np.ones((3, 2), np.float32), "w")])
save("gather_ids", [h.make_node("Gather", ["emb", "ids"], ["y"], axis=0)],
     [vi("ids", T.INT64, [1, 3])], [vi("y", T.FLOAT, [1, 3, 2])],
     [nh.from_array(np.arange(10, dtype=np.float32).reshape(5, 2), "emb")],
     {"perceiver_edge.range.ids": "0 4"})
save("constant_of_shape", [h.make_node("ConstantOfShape", ["s"], ["c"], value=nh.from_array(np.array([1.0], np.float32))),
                           h.make_node("Add", ["x", "c"], ["y"])],
     [vi("x", T.FLOAT, [2, 2])], [vi("y", T.FLOAT, [2, 2])], [nh.from_array(np.array([2, 2], np.int64), "s")])
save("reshape_transpose", [h.make_node("Reshape", ["x", "s"], ["r"]), h.make_node("Transpose", ["r"], ["y"], perm=[1, 0])],
     [vi("x", T.FLOAT, [1, 6])], [vi("y", T.FLOAT, [3, 2])], [nh.from_array(np.array([2, 3], np.int64), "s")])
PY

# board_profile
cp targets/*.toml "$c/board_profile/"

# pack_reader
"$bin" export "$tiny_if" --format pack -o "$c/pack_reader/tiny_image_fourier_f32.pack" > /dev/null
"$bin" export "$tiny_if" --format pack --pack-precision int8 -o "$c/pack_reader/tiny_image_fourier_int8.pack" > /dev/null

du -sh "$c"/* "$c"
