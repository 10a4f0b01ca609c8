#!/usr/bin/env python3
"""Run a split model folder (perceiver-edge export --split) in onnxruntime.

    python check_split.py DIR --input NAME=FILE ... --expect NAME=FILE ... [--atol A --rtol R]

Checks every part with onnx.checker (full_check), then chains them as the engine does:
encoder (model inputs -> latents, and any query-side values such as optical flow's `queries`),
the block part `blocks` times (manifest), the full decoder (latents + the values it reads). Every output must be within atol + rtol * |expected| of
the expected .npy. Each query-bucket decoder then decodes a spread of chosen positions (every
index input at once: `index_input`, or multimodal's `point_inputs`), which must equal the full
decoder's outputs at those positions to 1e-5. Prints one line; exits non-zero on any failure.
Needs numpy, onnx and onnxruntime (requirements-ci.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def session(path: Path) -> ort.InferenceSession:
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--expect", action="append", default=[])
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-5)
    a = ap.parse_args()
    m = json.loads((a.dir / "manifest.json").read_text())
    feeds = {k: np.load(v) for k, v in (s.split("=", 1) for s in a.input)}
    enc = session(a.dir / m["encoder"])
    names = [o.name for o in enc.get_outputs()]
    carried = dict(zip(names, enc.run(names, {i.name: feeds[i.name] for i in enc.get_inputs()})))
    z = carried.pop("latents")
    feeds.update(carried)  # encoder outputs the decoders read (optical flow's queries)
    if m["block"]:
        blk = session(a.dir / m["block"])
        for _ in range(m["blocks"]):
            z = blk.run(["latents_out"], {"latents": z})[0]
    dec = session(a.dir / m["decoders"][0]["file"])
    args = {i.name: (z if i.name == "latents" else feeds[i.name]) for i in dec.get_inputs()}
    outs = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, args)))
    # Index inputs: (name, positions of a full decode, the output they choose or None for all).
    if m.get("point_inputs"):
        index = [(p["name"], p["positions"], p["output"]) for p in m["point_inputs"]]
    elif m.get("index_input"):
        index = [(m["index_input"], m["num_queries"], None)]
    else:
        index = []
    bucket_err = 0.0
    for d in m["decoders"][1:]:
        bucket = session(a.dir / d["file"])
        chosen = {}
        for name, n, out in index:
            k = min(d["queries"], n)
            chosen[name] = ((np.arange(k) * 7919 + 3) % n).astype(np.int64), n, out
        args = {}
        for i in bucket.get_inputs():
            args[i.name] = z if i.name == "latents" else chosen[i.name][0] if i.name in chosen else feeds[i.name]
        got = dict(zip([o.name for o in bucket.get_outputs()], bucket.run(None, args)))
        for name, y in got.items():
            full = outs[name]
            sel = [(idx, n) for idx, n, out in chosen.values() if out in (None, name)]
            want = full if not sel else full.reshape(full.shape[0], sel[0][1], -1)[:, sel[0][0]].reshape(y.shape)
            err = float(np.abs(y.astype(np.float64) - want).max())
            if err > 1e-5:
                print(f"FAIL {a.dir}: {d['file']} {name} differs from the full decode there by {err:.3e}")
                return 1
            bucket_err = max(bucket_err, err)
    worst = 0.0
    for name, file in (s.split("=", 1) for s in a.expect):
        want = np.load(file).astype(np.float64)
        got = outs[name].astype(np.float64)
        if got.shape != want.shape:
            print(f"FAIL {a.dir}: {name} shape {got.shape} != {want.shape}")
            return 1
        err = np.abs(got - want)
        if not (err <= a.atol + a.rtol * np.abs(want)).all():
            print(f"FAIL {a.dir}: {name} max |err| {err.max():.3e}")
            return 1
        worst = max(worst, float(err.max()))
    buckets = len(m["decoders"]) - 1
    tail = f"; {buckets} bucket decoder(s) equal the full decode at chosen positions (max {bucket_err:.3e})"
    parts = len(m["decoders"]) + 1 + bool(m["block"])
    print(f"ok {a.dir}: onnxruntime chain of {parts} parts, max |err| {worst:.3e}{tail if buckets else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
