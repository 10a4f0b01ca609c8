#!/usr/bin/env python3
"""perceiver-edge vs onnxruntime on the same PerceiverIO checkpoint (issue #3).

Builds the bench model (PerceiverForImageClassificationFourier, image 64x64, N=128 latents,
D=256, 6 latent self-attention layers, 1000 labels, seeded random weights; about 2.4 GFLOPs
unrewritten), saves it with save_pretrained into a temporary folder, then

* exports it with ``torch.onnx.export`` (opset 17) and runs that file in onnxruntime (CPU,
  intra-op threads 1 and 2, sequential execution, all graph optimisations);
* exports it with ``perceiver-edge export`` (default passes, or ``--no-rewrites`` for the
  unrewritten graph) and runs it with ``perceiver-edge bench --json``;

in interleaved rounds: each round times onnxruntime (``--runs`` runs, median) and then the engine
(same number of runs, p50), for each thread count. Prints per-round ratios, the median ratio of
the paired rounds, and the max abs difference of the outputs (engine vs onnxruntime vs torch).

Usage (from the repository root, after ``cargo build --release``):

    /work/refvenv/bin/python models/reference/bench_vs_onnxruntime.py [--rounds 5] [--runs 20]
        [--threads 1 2] [--bin target/release/perceiver-edge] [--export-arg=--no-rewrites]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def trained_like(model, seed: int = 1):
    """Gives `model`'s Linear biases and LayerNorm scales and shifts seeded random values, as a
    trained checkpoint has them. transformers initialises biases to 0 and LayerNorms to 1 and 0,
    and an engine drops an add of zeros or a product by ones: with them a benchmark times a graph
    lighter than any trained model's (one bias add per Linear, one scale and shift per LayerNorm).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.02 * torch.randn(m.bias.shape, generator=g))
    return model


def build_model(dirname: str):
    import torch
    from transformers import PerceiverConfig, PerceiverForImageClassificationFourier

    torch.manual_seed(0)
    cfg = PerceiverConfig(
        num_latents=128, d_latents=256, d_model=261, num_blocks=1, num_self_attends_per_block=6,
        num_self_attention_heads=8, num_cross_attention_heads=1, image_size=64, num_labels=1000,
    )
    model = trained_like(PerceiverForImageClassificationFourier(cfg).eval())
    model.save_pretrained(dirname)
    return model


def flops(n=128, d=256, m=64 * 64, c=261, layers=6, labels=1000):
    """Multiply-adds x 2 of the unrewritten forward pass (matmuls only)."""
    enc = 2 * (2 * m * c * d) + 2 * (2 * n * m * d) + 2 * (2 * n * d * d) + 2 * (2 * n * d * d)
    lat = layers * (4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * d)
    dec = 2 * (2 * n * d * d) + 2 * 2 * d * d + 2 * d * labels
    return enc + lat + dec


def matmul_peak(binary, tmp, runs):
    """f32 matmul peak of this machine: the best of [n, n] x [n, n] MatMuls (constant B,
    n = 256, 512, 1024) as ONNX files, timed in the engine (tract's kernels) and in onnxruntime
    (MLAS), single thread."""
    best = (0.0, 0.0)
    for n in (256, 512, 1024):
        t, o = matmul_once(binary, tmp, runs, n)
        best = (max(best[0], t), max(best[1], o))
    print(f"f32 matmul peak (best of 256^3, 512^3, 1024^3; 1 thread): tract {best[0]:.1f} GFLOP/s, "
          f"onnxruntime (MLAS) {best[1]:.1f} GFLOP/s")
    return best


def matmul_once(binary, tmp, runs, n):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [numpy_helper.from_array(b, "b")])
    path = os.path.join(tmp, f"matmul_{n}.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    a = np.random.default_rng(2).standard_normal((n, n)).astype(np.float32)
    np.save(os.path.join(tmp, f"matmul_a{n}.npy"), a)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ort_time(s, {"a": a}, 3)
    gflop = 2 * n ** 3 / 1e9
    o = ort_time(s, {"a": a}, runs * 4)
    e = engine_time(binary, path, os.path.join(tmp, f"matmul_a{n}.npy"), runs * 4, 1)
    print(f"  matmul {n}^3, 1 thread: tract {gflop / e * 1e3:.1f} GFLOP/s, onnxruntime (MLAS) "
          f"{gflop / o * 1e3:.1f} GFLOP/s")
    return gflop / e * 1e3, gflop / o * 1e3


def ort_time(sess, feed, runs):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def engine_time(binary, onnx, inp, runs, threads):
    out = subprocess.run(
        [binary, "bench", onnx, "--runs", str(runs), "--warmup", "3", "--threads", str(threads), "--json",
         "--input", inp],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["latency_ms"]["p50"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/perceiver-edge")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--export-arg", action="append", default=[], help="extra perceiver-edge export argument")
    ap.add_argument("--peak", action="store_true", help="also measure the f32 matmul peak")
    ap.add_argument("--keep", help="keep the exported files in this folder")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    tmp = args.keep or tempfile.mkdtemp(prefix="pe-bench-")
    os.makedirs(tmp, exist_ok=True)
    ck = os.path.join(tmp, "checkpoint")
    model = build_model(ck)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    inp = os.path.join(tmp, "pixels.npy")
    np.save(inp, x)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x)).logits.numpy()

    ort_path = os.path.join(tmp, "torch_export.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(x),), ort_path, opset_version=17, input_names=["pixel_values"],
                          output_names=["logits"], dynamo=False)
    pe_path = os.path.join(tmp, "perceiver_edge.onnx")
    subprocess.run([args.bin, "export", ck, "-o", pe_path, *args.export_arg], check=True)

    out_npy = os.path.join(tmp, "pe_logits.npy")
    subprocess.run([args.bin, "run", pe_path, "--input", inp, "--output", out_npy], check=True,
                   capture_output=True)
    pe_out = np.load(out_npy)

    sessions = {}
    for t in args.threads:
        so = ort.SessionOptions()
        so.intra_op_num_threads = t
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[t] = ort.InferenceSession(ort_path, so, providers=["CPUExecutionProvider"])
    feed = {"pixel_values": x}
    ort_out = sessions[args.threads[0]].run(None, feed)[0]
    for s in sessions.values():
        ort_time(s, feed, 3)  # warm-up

    gflop = flops() / 1e9
    print(f"bench model: 64x64 Fourier image, N=128 D=256, 6 latent layers, {gflop:.2f} GFLOP unrewritten")
    print(f"max |perceiver-edge - onnxruntime| = {np.abs(pe_out - ort_out).max():.3g}")
    print(f"max |perceiver-edge - torch|       = {np.abs(pe_out - ref).max():.3g}")
    print(f"max |onnxruntime - torch|          = {np.abs(ort_out - ref).max():.3g}")
    peak = matmul_peak(args.bin, tmp, args.runs) if args.peak else None
    results = {}
    for t in args.threads:
        rows = []
        for r in range(args.rounds):
            o = ort_time(sessions[t], feed, args.runs)
            e = engine_time(args.bin, pe_path, inp, args.runs, t)
            rows.append((o, e, e / o))
            print(f"threads={t} round {r}: onnxruntime p50 {o:7.2f} ms  perceiver-edge p50 {e:7.2f} ms  ratio {e / o:.3f}",
                  flush=True)
        ratio = statistics.median(row[2] for row in rows)
        o50 = statistics.median(row[0] for row in rows)
        e50 = statistics.median(row[1] for row in rows)
        results[t] = dict(ort_ms=o50, engine_ms=e50, ratio=ratio)
        print(f"threads={t}: onnxruntime {o50:.2f} ms ({gflop / o50 * 1e3:.1f} GFLOP/s-equiv), perceiver-edge "
              f"{e50:.2f} ms ({gflop / e50 * 1e3:.1f} GFLOP/s-equiv), median paired ratio {ratio:.3f}")
    print(json.dumps({"results": results, "peak_gflops_tract_ort": peak, "max_abs_vs_onnxruntime": float(np.abs(pe_out - ort_out).max()),
                      "max_abs_vs_torch": float(np.abs(pe_out - ref).max())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
