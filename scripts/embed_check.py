#!/usr/bin/env python3
"""Checks the C API examples' JSON lines against `perceiver-edge run` outputs (scripts/embed.sh).

usage: embed_check.py --model NAME --cli DIR --samples N EXAMPLE.jsonl...

DIR/<sample>/<output>.npy are the CLI's outputs for each sample. Every line's `class` must be the
arg-max (first maximum) of the CLI's first output, and every printed output value, read back as
float32, must be bit-identical to the CLI's (with --rtol R: within R x max(1, |value|), for a run
on another CPU's kernels). Prints one compact JSON line per example line and a summary; exits 1 on
any difference. Python standard library only (no numpy).
"""
import argparse
import ast
import json
import math
import struct
import sys
from pathlib import Path


def read_f32_npy(path):
    """(shape, list of float32 values as 4-byte strings) of a little-endian float32 C-order .npy."""
    data = Path(path).read_bytes()
    if data[:6] != b"\x93NUMPY":
        raise ValueError(f"{path}: not a .npy file")
    if data[6] == 1:
        (n,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (n,), start = struct.unpack("<I", data[8:12]), 12
    header = ast.literal_eval(data[start:start + n].decode("latin1"))
    if header["descr"] != "<f4" or header["fortran_order"]:
        raise ValueError(f"{path}: expected a float32 C-order array, got {header}")
    body = data[start + n:]
    count = math.prod(header["shape"])
    return header["shape"], [body[4 * i:4 * i + 4] for i in range(count)]


def same_f32(printed, raw, rtol=0.0):
    want = struct.unpack("<f", raw)[0]
    if printed is None:  # the examples print non-finite values as null
        return not math.isfinite(want)
    if rtol > 0:
        return abs(printed - want) <= rtol * max(1.0, abs(want))
    return struct.pack("<f", printed) == raw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cli", required=True, type=Path)
    ap.add_argument("--samples", required=True, type=int)
    ap.add_argument("--rtol", type=float, default=0.0, help="tolerance instead of bit-identity")
    ap.add_argument("jsonl", nargs="+", type=Path)
    args = ap.parse_args()

    bad, values, seen = 0, 0, {}
    for f in args.jsonl:
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            example, sample = rec["example"], rec["sample"]
            seen.setdefault(example, set()).add(sample)
            outputs = rec["outputs"]
            problems = []
            first = None
            for name, printed in outputs.items():
                shape, raw = read_f32_npy(args.cli / sample / f"{name}.npy")
                if first is None:
                    first = [struct.unpack("<f", r)[0] for r in raw]
                if len(printed) != len(raw):
                    problems.append(f"{name}: {len(printed)} values, the CLI wrote {len(raw)}")
                    continue
                diff = [i for i, (p, r) in enumerate(zip(printed, raw)) if not same_f32(p, r, args.rtol)]
                if diff:
                    i = diff[0]
                    problems.append(f"{name}: {len(diff)} value(s) differ, first [{i}] {printed[i]!r} vs CLI {struct.unpack('<f', raw[i])[0]!r}")
                values += len(raw)
            cli_class = max(range(len(first)), key=lambda i: (first[i], -i))
            if rec["class"] != cli_class:
                problems.append(f"class {rec['class']}, the CLI's arg-max is {cli_class}")
            if "score" in rec and not same_f32(rec["score"], struct.pack("<f", first[cli_class]), args.rtol):
                problems.append(f"score {rec['score']!r}, the CLI's maximum is {first[cli_class]!r}")
            print(json.dumps({"example": example, "sample": sample, "class": rec["class"], "cli_class": cli_class,
                              "identical_to_cli": not problems}))
            for p in problems:
                print(f"  {args.model} {example} {sample}: {p}", file=sys.stderr)
            bad += bool(problems)
    for example, samples in sorted(seen.items()):
        if len(samples) != args.samples:
            print(f"{args.model}: example {example} printed {len(samples)} sample(s), expected {args.samples}", file=sys.stderr)
            bad += 1
    if len(seen) != len(args.jsonl) or bad:
        print(f"{args.model}: FAILED ({bad} mismatching line(s))", file=sys.stderr)
        return 1
    print(f"{args.model}: {args.samples} samples x {len(seen)} examples ({', '.join(sorted(seen))}): classes and all "
          f"{values} printed output values {'within ' + str(args.rtol) + ' of' if args.rtol else 'identical to'} "
          f"`perceiver-edge run`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
