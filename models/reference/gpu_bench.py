#!/usr/bin/env python3
"""`--device cuda` against the CPU (issue #11 item 5): latency, load time, host memory and
fidelity of the bench model and the published architectures on a GPU machine.

Usage (from the repository root, with a binary built with `--features cuda-13` or `cuda`):

    python3 models/reference/gpu_bench.py --bin target/release/perceiver-edge
        [--models bench,vision-fourier] [--precisions f32,f16,int8,q4] [--threads 1,all]
        [--rounds 2] [--runs R] [--warmup W] [--work DIR] [--json FILE] [--device cuda]

Checkpoints, seeded inputs and transformers' outputs are made and cached as peer_bench.py does
(WORK/MODEL/, WORK/MODEL.in.NAME.npy, WORK/MODEL.ref.npy; torch and transformers needed once).
For each precision the script exports WORK/MODEL-PREC.onnx, runs it with `perceiver-edge run` on
the CPU and with `--device cuda`, and reports max |GPU - CPU| and each one's max difference to
transformers; then each round times `perceiver-edge bench --json` on the CPU at every --threads
count and on the GPU, in turn (p50, load + optimise time, peak host RSS; medians over rounds).
Where onnxruntime has its CUDA provider, it times that on the same graph as a peer. Defaults:
--runs 50 and --warmup 5 for the bench model, 10 and 2 for the published ones. `--device cpu`
runs the whole script without a GPU (both columns on the CPU), to try it out. targets/check-gpu.sh
calls it after the fixture checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from peer_bench import (MODELS, PRECISIONS, checked_args, engine, exported, fmt, graph_feed,  # noqa: E402
                        max_abs, med, named_inputs, ort_time, prepared, say)


def ort_cuda(path: Path, feed, warmup: int, runs: int):
    """(median ms, output) of onnxruntime's CUDA provider on `path`, or (None, None) without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, None
    try:
        sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
        ort_time(sess, feed, max(warmup, 1))
        return ort_time(sess, feed, runs)
    except Exception as e:  # noqa: BLE001 - report and go on without the peer
        say(f"  onnxruntime (CUDA) cannot run {path.name}: {str(e).strip()[:300]}")
        return None, None


def bench_json(a, path: Path, files, runs: int, warmup: int, extra: list[str]):
    cmd = [a.bin, "bench", str(path), "--runs", str(runs), "--warmup", str(warmup), "--json"] + extra
    try:
        return json.loads(engine(cmd + sum((["--input", str(f)] for f in files), [])))
    except RuntimeError as e:
        say(f"  bench {' '.join(extra)} failed: {e}")
        return None


def one_model(name: str, a, threads: list[int], rows: list[dict]) -> None:
    work = a.work
    ck, feeds, runs, warmup, ref, _ = prepared(name, a, runs=(50, 10), warmup=(5, 2))
    for prec in a.precisions:
        tag = f"[{name} {prec}]"
        try:
            path = exported(a, name, prec, ck)
            outs, feed, files = graph_feed(path, name, feeds, work)
            got = {}
            for key, dev in (("cpu", "cpu"), ("cuda", a.device)):
                out_dir = work / f"{name}-{prec}-{key}-out"
                out_dir.mkdir(exist_ok=True)
                engine([a.bin, "run", str(path), "--device", dev, "--output", str(out_dir)] + named_inputs(feed, files))
                got[key] = np.load(out_dir / f"{outs[0]}.npy")
        except RuntimeError as e:
            say(f"{tag} skipped: {e}")
            continue
        gpu_cpu = max_abs(got["cuda"], got["cpu"])
        scale = float(np.abs(got["cpu"]).max())
        say(f"{tag} max |GPU - CPU| {gpu_cpu:.3g} (max |CPU output| {scale:.3g}); vs transformers: "
            f"CPU {max_abs(got['cpu'], ref):.3g}, GPU {max_abs(got['cuda'], ref):.3g}")
        ort_ms, ort_out = ort_cuda(path, feed, warmup, runs)
        rounds = []
        for r in range(a.rounds):
            row = {}
            for t in threads:
                row[f"cpu{t}"] = bench_json(a, path, files, runs, warmup, ["--threads", str(t)])
            row["cuda"] = bench_json(a, path, files, runs, warmup, ["--device", a.device])
            rounds.append(row)
            say(f"{tag} round {r}: " + ", ".join(
                f"{k} p50 {fmt(v and v['latency_ms']['p50'], ms=True)}" for k, v in row.items()))
        keys = [f"cpu{t}" for t in threads] + ["cuda"]

        def stat(key, get):
            return med(get(row[key]) if row[key] else None for row in rounds)

        rows.append(dict(
            model=name, precision=prec, runs=runs, warmup=warmup, threads=threads,
            p50_ms={k: stat(k, lambda j: j["latency_ms"]["p50"]) for k in keys},
            p99_ms={k: stat(k, lambda j: j["latency_ms"]["p99"]) for k in keys},
            load_ms={k: stat(k, lambda j: j["load_ms"]) for k in keys},
            peak_rss_mib={k: stat(k, lambda j: j["memory"]["peak_rss"] and j["memory"]["peak_rss"] / 2**20)
                          for k in keys},
            ort_cuda_ms=ort_ms, max_abs_gpu_cpu=gpu_cpu, max_abs_cpu_output=scale,
            max_abs_cpu_ref=max_abs(got["cpu"], ref), max_abs_gpu_ref=max_abs(got["cuda"], ref),
            max_abs_ort_cuda_ref=max_abs(ort_out, ref), rounds=rounds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bench,vision-fourier", help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--precisions", default="f32,f16,int8,q4", help=f"comma-separated, of: {', '.join(PRECISIONS)}")
    ap.add_argument("--threads", default="1,all", help="CPU thread counts; all = os.cpu_count()")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, help="timed runs per measurement [50 bench, 10 published]")
    ap.add_argument("--warmup", type=int, help="warm-up runs [5 bench, 2 published]")
    ap.add_argument("--work", type=Path, help="checkpoints, graphs, inputs, references [a new temp folder]")
    ap.add_argument("--bin", default="target/release/perceiver-edge", help="binary built with a cuda feature")
    ap.add_argument("--json", type=Path, help="write all figures to this file")
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a dry run of the script)")
    a = ap.parse_args()
    a.skip_torch_export = True  # for peer_bench.reference: transformers' outputs only
    threads = checked_args(a, prefix="pe-gpu-")
    if threads is None:
        return 1
    say(f"work folder {a.work}; binary {a.bin}; CPU threads {threads}; {os.cpu_count()} CPUs")
    rows: list[dict] = []
    for name in a.models:
        one_model(name, a, threads, rows)
        if a.json:  # after each model, so that a cut-off run keeps what it measured
            a.json.write_text(json.dumps(dict(bin=a.bin, cpus=os.cpu_count(), rows=rows), indent=1))
    keys = [f"cpu{t}" for t in threads] + ["cuda"]
    print()
    print("| model | precision | " + " | ".join(f"{k} p50 ms" for k in keys) + " | onnxruntime CUDA ms "
          "| GPU load ms | CPU load ms | GPU peak RSS MiB | CPU peak RSS MiB | max abs GPU - CPU "
          "| max abs GPU - transformers |")
    print("|---|---|" + "---|" * (len(keys) + 7))
    for r in rows:
        cpu = f"cpu{threads[-1]}"
        print(f"| {r['model']} | {r['precision']} | " + " | ".join(fmt(r["p50_ms"][k]) for k in keys)
              + f" | {fmt(r['ort_cuda_ms'])} | {fmt(r['load_ms']['cuda'], '.0f')} | {fmt(r['load_ms'][cpu], '.0f')}"
              f" | {fmt(r['peak_rss_mib']['cuda'], '.0f')} | {fmt(r['peak_rss_mib'][cpu], '.0f')}"
              f" | {fmt(r['max_abs_gpu_cpu'], '.3g')} | {fmt(r['max_abs_gpu_ref'], '.3g')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
