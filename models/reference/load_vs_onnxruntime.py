#!/usr/bin/env python3
"""Load time: perceiver-edge against onnxruntime's session creation on the same ONNX files.

Usage (from the repository root, after ``cargo build --release``):

    python models/reference/load_vs_onnxruntime.py MODEL.onnx [MODEL.onnx ...]
        [--bin target/release/perceiver-edge[,OTHER_BIN ...]] [--rounds 3]

Each round times, for every file in turn, each binary's ``bench MODEL --runs 1 --warmup 0`` (the
``load`` line: parse and optimise, in the process) and ``onnxruntime.InferenceSession(MODEL)``
(CPU provider, one intra-op thread, all graph optimisations; timed in this process). Prints the
medians over rounds, each binary's peak RSS at load, and the last binary's time over
onnxruntime's. Several binaries (comma-separated) compare builds on the same files, alternated.
A binary copied just before may start with a larger RSS (the page cache holds it in larger
folios); compare peaks of binaries read the same way.
"""
import argparse
import re
import statistics
import subprocess
import sys
import time

import onnxruntime as ort


def engine_load(binary, model):
    out = subprocess.run([binary, "bench", model, "--runs", "1", "--warmup", "0"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{binary} bench {model}: {out.stderr.strip()}")
    load = float(re.search(r"^load\s+([0-9.]+) ms", out.stdout, re.M).group(1)) / 1000
    peak = float(re.search(r"at load ([0-9.]+) MiB", out.stdout).group(1))
    return load, peak


def ort_load(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    start = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    elapsed = time.perf_counter() - start
    del session
    return elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--bin", default="target/release/perceiver-edge")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    bins = a.bin.split(",")
    print("| file | " + " | ".join(f"{b} load s (peak at load MiB)" for b in bins) + " | onnxruntime s | last / onnxruntime |")
    print("|---" * (len(bins) + 3) + "|")
    for model in a.models:
        loads = {b: [] for b in bins}
        peaks = {b: [] for b in bins}
        theirs = []
        for _ in range(a.rounds):
            for b in bins:
                load, peak = engine_load(b, model)
                loads[b].append(load)
                peaks[b].append(peak)
            theirs.append(ort_load(model))
        med = {b: statistics.median(v) for b, v in loads.items()}
        cells = " | ".join(f"{med[b]:.2f} ({statistics.median(peaks[b]):.0f})" for b in bins)
        ratio = med[bins[-1]] / statistics.median(theirs)
        print(f"| {model} | {cells} | {statistics.median(theirs):.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
