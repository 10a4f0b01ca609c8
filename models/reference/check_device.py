#!/usr/bin/env python3
"""Runs every reference fixture through a built `perceiver-edge` binary on a device and compares
the outputs with transformers' (the fixture's tolerance).

For a board or GPU machine without cargo or torch: it needs the binary (built with the exporter,
plus `--features cuda` / `cuda-13` for `--device cuda`), this repository's
models/reference/fixtures folder, and Python 3 with numpy.

    python3 models/reference/check_device.py --bin target/release/perceiver-edge --device cuda \
        [--fixtures models/reference/fixtures] [--precision int8 --reference-bin HOST_BIN]

    # a board build (no exporter) under emulation; the host binary exports:
    python3 models/reference/check_device.py --bin target/aarch64-unknown-linux-gnu/release/perceiver-edge \
        --runner "qemu-aarch64 -cpu max" --export-bin target/release/perceiver-edge

With --precision other than f32 the outputs are compared with those of the same graph run by
--reference-bin (default: --export-bin) on the host, to --atol / --rtol: the check that a
device's kernels (ARM int8 / fp16, CUDA) compute what the host's do.

Prints one line per case output and a summary; exits 1 if any case fails or errors.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/perceiver-edge")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "fixtures"))
    ap.add_argument("--runner", default="", help="emulator prefix, e.g. 'qemu-aarch64 -cpu max'")
    ap.add_argument("--export-bin", default=None, help="binary that exports (default: --bin, with --runner)")
    ap.add_argument("--precision", default=None, help="export precision (default f32)")
    ap.add_argument("--reference-bin", default=None, help="host binary giving the reference outputs "
                    "of a quantised graph (default: --export-bin)")
    ap.add_argument("--atol", type=float, default=None, help="tolerance against the host (quantised; "
                    "default 1e-4, f16: 1e-2 x max |output|, as ARM computes in f16 where x86 emulates)")
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()
    runner = shlex.split(args.runner)
    exporter = [args.export_bin] if args.export_bin else runner + [args.bin]
    quantised = args.precision not in (None, "f32")
    reference = args.reference_bin or args.export_bin or args.bin
    passed, failed = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for fixture in sorted(os.listdir(args.fixtures)):
            d = os.path.join(args.fixtures, fixture)
            meta_path = os.path.join(d, "fixture.json")
            if not os.path.isfile(meta_path):
                continue
            meta = json.load(open(meta_path))
            for case in meta["cases"]:
                name = f"{fixture}/{case['name']}"
                atol = case.get("atol", meta.get("atol", 1e-4))
                rtol = case.get("rtol", meta.get("rtol", 1e-5))
                onnx = os.path.join(tmp, f"{fixture}__{case['name']}.onnx")
                out_dir = os.path.join(tmp, f"{fixture}__{case['name']}.out") + "/"
                export = exporter + ["export", d, "-o", onnx] + case["export_args"]
                if args.precision:
                    export += ["--precision", args.precision]
                inputs = [a for i in case["inputs"] for a in ("--input", os.path.join(d, i["file"]))]
                run = runner + [args.bin, "run", onnx, "--device", args.device, "--output", out_dir] + inputs
                ref_dir = out_dir[:-1] + ".ref/"
                ref_run = [reference, "run", onnx, "--output", ref_dir] + inputs
                ok = True
                for cmd in (export, run) + ((ref_run,) if quantised else ()):
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    if p.returncode != 0:
                        print(f"ERROR {name}: {' '.join(cmd[:3])} ...: {p.stderr.strip().splitlines()[-1:]}")
                        failed.append(name)
                        ok = False
                        break
                if not ok:
                    continue
                for o in case["outputs"]:
                    got = np.load(os.path.join(out_dir, o["name"] + ".npy")).astype(np.float64)
                    if quantised:
                        want = np.load(os.path.join(ref_dir, o["name"] + ".npy")).astype(np.float64)
                        if args.atol is not None:
                            atol, rtol = args.atol, args.rtol
                        elif args.precision == "f16":
                            atol, rtol = 1e-2 * float(np.abs(want).max()), 0.0
                        else:
                            atol, rtol = 1e-4, args.rtol
                    else:
                        want = np.load(os.path.join(d, o["file"])).astype(np.float64)
                    if got.shape != want.shape:
                        print(f"FAIL  {name} {o['name']}: shape {got.shape} vs {want.shape}")
                        failed.append(name)
                        continue
                    err = np.abs(got - want)
                    bad = err > atol + rtol * np.abs(want)
                    status = "ok   " if not bad.any() else "FAIL "
                    against = "host" if quantised else "transformers"
                    print(f"{status} {args.device:<5} {name:<24} {o['name']:<18} max |err| {err.max():.2e}"
                          f" vs {against} (tolerance {atol:g} + {rtol:g}|x|)")
                    if bad.any():
                        failed.append(name)
                    else:
                        passed += 1
    print(f"{passed} outputs passed, {len(failed)} failed on device {args.device}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
