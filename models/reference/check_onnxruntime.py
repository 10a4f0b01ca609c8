#!/usr/bin/env python3
"""Check exported ONNX graphs against the reference fixtures with onnxruntime.

    python check_onnxruntime.py --onnx-dir DIR --fixtures models/reference/fixtures

For every case of every fixture (fixtures/<fixture>/fixture.json) this loads
DIR/<fixture>__<case>.onnx (the naming the Rust export test uses), runs
onnx.checker.check_model(full_check=True), runs the graph on the case inputs
with onnxruntime's CPUExecutionProvider and requires, for every output,
    |got - expected| <= atol + rtol * |expected|      (elementwise)
with atol / rtol from fixture.json (defaults 1e-4 / 1e-5). Graph input and
output names must match the fixture, in order.

Prints one line per case and ends with "N passed, M failed". Exits non-zero on
any failure or when no ONNX file was found at all. Cases without an ONNX file
are reported as missing and are not failures unless --require-all is given.

Needs only numpy, onnx and onnxruntime (requirements-ci.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5


def load_cases(fixture_dir: Path) -> list[dict]:
    meta = json.loads((fixture_dir / "fixture.json").read_text())
    if "cases" in meta:
        cases = meta["cases"]
    else:  # single-case layout: the case fields live at the top level
        cases = [dict(meta, name=meta.get("name", "default"))]
    for c in cases:
        c.setdefault("atol", meta.get("atol", DEFAULT_ATOL))
        c.setdefault("rtol", meta.get("rtol", DEFAULT_RTOL))
    return cases


def check_case(onnx_path: Path, fixture_dir: Path, case: dict, threads: int) -> tuple[bool, str]:
    onnx.checker.check_model(str(onnx_path), full_check=True)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

    want_in = [i["name"] for i in case["inputs"]]
    have_in = [i.name for i in sess.get_inputs()]
    if want_in != have_in:
        return False, f"graph inputs {have_in} != fixture inputs {want_in}"
    want_out = [o["name"] for o in case["outputs"]]
    have_out = [o.name for o in sess.get_outputs()]
    if want_out != have_out:
        return False, f"graph outputs {have_out} != fixture outputs {want_out}"

    feeds = {i["name"]: np.load(fixture_dir / i["file"]) for i in case["inputs"]}
    got = sess.run(want_out, feeds)

    atol, rtol = float(case["atol"]), float(case["rtol"])
    worst_abs, worst_ratio, problems = 0.0, 0.0, []
    for spec, y in zip(case["outputs"], got):
        exp = np.load(fixture_dir / spec["file"])
        y = np.asarray(y)
        if y.shape != exp.shape:
            problems.append(f"{spec['name']}: shape {list(y.shape)} != expected {list(exp.shape)}")
            continue
        if not np.isfinite(y).all():
            problems.append(f"{spec['name']}: non-finite values")
            continue
        err = np.abs(y.astype(np.float64) - exp.astype(np.float64))
        tol = atol + rtol * np.abs(exp.astype(np.float64))
        ratio = float((err / tol).max()) if err.size else 0.0
        max_err = float(err.max()) if err.size else 0.0
        worst_abs = max(worst_abs, max_err)
        worst_ratio = max(worst_ratio, ratio)
        if ratio > 1.0:
            at = np.unravel_index(int(np.argmax(err / tol)), err.shape)
            problems.append(
                f"{spec['name']}: max abs err {max_err:.3e}, worst at {list(map(int, at))}: "
                f"got {float(y[at]):.6g} expected {float(exp[at]):.6g} (err/tol {ratio:.2f})"
            )
    summary = f"max abs err {worst_abs:.2e}, err/tol {worst_ratio:.3f}"
    if problems:
        return False, summary + "; " + "; ".join(problems)
    return True, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx-dir", required=True, type=Path, help="directory holding <fixture>__<case>.onnx")
    ap.add_argument(
        "--fixtures",
        type=Path,
        default=Path(__file__).resolve().parent / "fixtures",
        help="fixtures directory (default: next to this script)",
    )
    ap.add_argument("--require-all", action="store_true", help="a missing .onnx file counts as a failure")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing cases")
    args = ap.parse_args()

    if not args.fixtures.is_dir():
        print(f"fixtures directory {args.fixtures} not found", file=sys.stderr)
        return 2
    if not args.onnx_dir.is_dir():
        print(f"onnx directory {args.onnx_dir} not found", file=sys.stderr)
        return 2

    passed = failed = missing = found = 0
    expected_files = set()
    for fixture_dir in sorted(p for p in args.fixtures.iterdir() if (p / "fixture.json").is_file()):
        for case in load_cases(fixture_dir):
            label = f"{fixture_dir.name}/{case['name']}"
            fname = f"{fixture_dir.name}__{case['name']}.onnx"
            expected_files.add(fname)
            onnx_path = args.onnx_dir / fname
            if not onnx_path.is_file():
                missing += 1
                if args.require_all:
                    failed += 1
                    print(f"FAIL    {label}: {fname} not found")
                else:
                    print(f"MISSING {label}: {fname} not found")
                continue
            found += 1
            try:
                ok, msg = check_case(onnx_path, fixture_dir, case, args.threads)
            except Exception as e:  # checker / session / run errors
                ok, msg = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                if args.verbose:
                    traceback.print_exc()
            if ok:
                passed += 1
                print(f"PASS    {label}: {msg}")
            else:
                failed += 1
                print(f"FAIL    {label}: {msg}")

    for stray in sorted(p.name for p in args.onnx_dir.glob("*.onnx") if p.name not in expected_files):
        print(f"note: {stray} does not match any fixture case")
    if missing:
        print(f"{missing} case(s) without an ONNX file")
    if found == 0:
        print("no ONNX files found for any fixture case")
    print(f"{passed} passed, {failed} failed")
    return 0 if (failed == 0 and found > 0) else 1


if __name__ == "__main__":
    sys.exit(main())
