#!/usr/bin/env python3
"""Byte-identity check for refactors: exports every fixture case (f32, f16, int8, int8-static,
q4), models/digits and models/marker in several modes (rewrites off, tables off, budgets, the
weight pack) and prints a sha256 prefix of each output file and of the export report.

    python3 scripts/export_hashes.py . target/release/perceiver-edge > before.txt
    (change the code, rebuild)
    python3 scripts/export_hashes.py . target/release/perceiver-edge > after.txt
    diff before.txt after.txt   # empty: the refactor changed no exported byte
"""
import hashlib, json, subprocess, sys, pathlib
root = pathlib.Path(sys.argv[1]); binp = sys.argv[2]
fx = root / "models/reference/fixtures"
jobs = []
for d in sorted(fx.iterdir()):
    if not (d / "fixture.json").is_file(): continue
    meta = json.loads((d / "fixture.json").read_text())
    for c in meta["cases"]:
        for p in ["f32", "f16", "int8", "q4", "int8-static"]:
            jobs.append((f"{d.name}__{c['name']}__{p}", [str(d)] + c["export_args"] + ["--precision", p]))
for m, extra in [("digits", []), ("marker", ["--seq-len", "256"])]:
    for p in ["f32", "f16", "int8", "q4", "int8-static"]:
        jobs.append((f"{m}__{p}", [str(root / "models" / m)] + extra + ["--precision", p]))
    jobs.append((f"{m}__norewrites", [str(root / "models" / m)] + extra + ["--no-rewrites"]))
    jobs.append((f"{m}__notables", [str(root / "models" / m)] + extra + ["--no-position-tables"]))
jobs.append(("digits__lat8calib", [str(root / "models/digits"), "--latents", "8", "--calibrate", str(root / "models/digits/samples")]))
jobs.append(("digits__blocks1", [str(root / "models/digits"), "--blocks", "1"]))
jobs.append(("digits__pack", [str(root / "models/digits"), "--format", "pack"]))
jobs.append(("digits__pack_int8", [str(root / "models/digits"), "--format", "pack", "--pack-precision", "int8"]))
t = pathlib.Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/perceiver-edge-export-hashes")  # the report names it
t.mkdir(exist_ok=True)
if True:
    for name, args in jobs:
        out = t / (name + ".out")
        r = subprocess.run([binp, "export"] + args + ["-o", str(out)], capture_output=True, text=True, cwd=root)
        sys.stdout.flush()
        if r.returncode != 0:
            print(f"{name} FAIL {r.stderr.strip()[:150]}")
        else:
            h = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
            print(f"{name} {h} {hashlib.sha256(r.stdout.encode()).hexdigest()[:8]}")
        if out.exists(): out.unlink()
