#!/usr/bin/env python3
"""Run a split model folder (perceiver-edge export --split) in onnxruntime.

    python check_split.py DIR --input NAME=FILE ... --expect NAME=FILE ... [--atol A --rtol R]

Checks every part with onnx.checker (full_check), then chains them as the engine does:
encoder (model inputs -> latents, and any query-side values such as optical flow's `queries`),
the block part `blocks` times (manifest), the full decoder (latents + the values it reads). Every output must be within atol + rtol * |expected| of
the expected .npy. Prints one line; exits non-zero on any failure. Needs numpy, onnx and
onnxruntime (requirements-ci.txt).
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
    for d in m["decoders"][1:]:
        session(a.dir / d["file"])  # checked, run by the Rust tests through the engine
    dec = session(a.dir / m["decoders"][0]["file"])
    args = {i.name: (z if i.name == "latents" else feeds[i.name]) for i in dec.get_inputs()}
    outs = dict(zip([o.name for o in dec.get_outputs()], dec.run(None, args)))
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
    print(f"ok {a.dir}: onnxruntime chain of {len(m['decoders']) + 1 + bool(m['block'])} parts, max |err| {worst:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
