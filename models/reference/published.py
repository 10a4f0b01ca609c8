#!/usr/bin/env python3
"""The published PerceiverIO architectures at their real sizes (issues #11 and #12): generates
each one with random weights from transformers (deepmind's configurations, never committed) and
measures peak RSS of `perceiver-edge export` / `run` against the bound of issue #12 and against
onnxruntime running the same graph.

    /work/refvenv/bin/python models/reference/published.py --bin target/release/perceiver-edge \
        --work /tmp/published [--archs vision-conv,vision-fourier] [--precisions f32,int8,q4]

Architectures (configurations as transformers' convert_perceiver_haiku_to_pytorch.py sets them):

    bench            the bench model of bench_vs_onnxruntime.py (64x64 Fourier, 128 latents x 256,
                     6 self-attention layers)
    vision-fourier   PerceiverForImageClassificationFourier, 224x224, 512 latents x 1024,
                     8 blocks x 6 self-attention layers (weights shared across blocks), d_model 261
    vision-learned   PerceiverForImageClassificationLearned, the same with d_model 512
    vision-conv      PerceiverForImageClassificationConvProcessing, the same with d_model 322
    language         PerceiverForMaskedLM, transformers' defaults (256 latents x 1280, 26 layers,
                     qk 256, v 1280), sequence 2048
    flow             PerceiverForOpticalFlow, deepmind/optical-flow-perceiver (flow_memory.py)

Checkpoints go to WORK/ARCH/ (generated once, reused). For each architecture and precision the
script prints the .onnx size, `export`'s and `run`'s peak RSS (/usr/bin/time -v), the resident
weights and largest activation `inspect` reports, `bench`'s peak RSS once loaded and its steady
RSS (after the warm-up run and after the last of --bench-runs runs, 3 by default), the bounds of
issue #12 (`run`: 1.3 x (weights + 2 x largest activation) + 40 MB; `export`: 2 x checkpoint +
output file) and onnxruntime's peak RSS running the same file (a separate process, CPU
provider, one run), then a markdown table. Needs torch and transformers (generation), numpy
and onnxruntime (inputs, the peer).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

VISION = dict(
    num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
    num_cross_attention_heads=1, num_self_attention_heads=8, qk_channels=None, v_channels=None,
    num_labels=1000, image_size=224,
)
ARCHS = {
    "vision-fourier": ("PerceiverForImageClassificationFourier", dict(VISION, d_model=261)),
    "vision-learned": ("PerceiverForImageClassificationLearned", dict(VISION, d_model=512)),
    "vision-conv": ("PerceiverForImageClassificationConvProcessing", dict(VISION, d_model=322)),
    "language": ("PerceiverForMaskedLM", dict(qk_channels=256, v_channels=1280)),
    "bench": ("PerceiverForImageClassificationFourier", None),
    "flow": ("PerceiverForOpticalFlow", None),
}


def generate(arch: str, ck: Path) -> None:
    """Writes config.json + model.safetensors of `arch` with seeded random weights."""
    if arch == "bench":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_vs_onnxruntime import build_model

        build_model(str(ck))
        return
    if arch == "flow":
        sys.path.insert(0, str(Path(__file__).parent))
        import flow_memory

        flow_memory.generate(ck)
        return
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_vs_onnxruntime import trained_like

    torch.manual_seed(0)
    cls, kw = ARCHS[arch]
    model = trained_like(getattr(transformers, cls)(transformers.PerceiverConfig(**kw)).eval())
    model.save_pretrained(ck, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"generated {ck} ({cls}, {n / 1e6:.1f} M parameters)", flush=True)


def timed(cmd: list[str]) -> tuple[float, str]:
    """Runs `cmd` under /usr/bin/time -v: (peak RSS in MiB, stdout)."""
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    return rss, r.stdout


def inputs_for(model: Path, folder: Path) -> list[str]:
    """Random inputs for every graph input of `model` (token ids below 262), as NAME=FILE."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    rng = np.random.default_rng(0)
    args = []
    for i in g.input:
        if i.name in inits:
            continue
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            x = rng.integers(0, 262, size=shape, dtype=np.int64)
            if "mask" in i.name:
                x = np.ones(shape, dtype=np.int64)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        p = folder / f"{i.name}.npy"
        np.save(p, x)
        args.append(f"{i.name}={p}")
    return args


ORT = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
feed = {a.split("=", 1)[0]: np.load(a.split("=", 1)[1]) for a in sys.argv[2:]}
s.run(None, feed)
"""


def mib_of(said: str, key: str) -> float:
    m = re.search(key + r"\s+([0-9.]+) MiB", said)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="perceiver-edge binary (release build)")
    ap.add_argument("--work", type=Path, required=True, help="checkpoints, exports and inputs go here")
    ap.add_argument("--archs", default="bench,vision-conv,vision-fourier,vision-learned,language")
    ap.add_argument("--precisions", default="f32", help="comma-separated: f32, f16, int8, q4")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--bench-runs", type=int, default=3,
                    help="timed runs of `bench` after one warm-up run (flow at 368x496 takes minutes per run)")
    a = ap.parse_args()
    rows = []
    for arch in a.archs.split(","):
        if arch not in ARCHS:
            sys.exit(f"--archs: unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")
        ck = a.work / arch
        if not (ck / "model.safetensors").is_file():
            generate(arch, ck)
        if a.generate_only:
            continue
        size = ["--seq-len", "2048"] if arch == "language" else []
        for prec in a.precisions.split(","):
            model = a.work / f"{arch}-{prec}.onnx"
            rss_e, _ = timed([a.bin, "export", str(ck), "-o", str(model), "--precision", prec] + size)
            _, said = timed([a.bin, "inspect", str(model)])
            resident = mib_of(said, "resident")
            weights = mib_of(said, "weights")
            act = mib_of(said, "largest activation")
            feed = inputs_for(model, a.work)
            out = a.work / f"{arch}-{prec}-out"
            out.mkdir(exist_ok=True)
            rss_r, _ = timed([a.bin, "run", str(model)] + sum((["--input", f] for f in feed), []) + ["--output", str(out)])
            _, said = timed([a.bin, "bench", str(model), "--runs", str(a.bench_runs), "--warmup", "1", "--json"]
                            + sum((["--input", f.split("=", 1)[1]] for f in feed), []))
            mem = json.loads(said)["memory"]
            load, warm, end = (mem[k] / 1048576 for k in ("peak_rss_load", "rss_after_warmup", "rss_end"))
            bound = 1.3 * (resident + 2 * act) + 40 * 1e6 / 1048576
            ck_mib = sum(f.stat().st_size for f in ck.glob("*.safetensors")) / 1048576
            bound_e = 2 * ck_mib + model.stat().st_size / 1048576 + sum(
                f.stat().st_size for f in a.work.glob(f"{model.name}.data")) / 1048576
            rss_o = float("nan")
            if not a.no_ort:
                rss_o, _ = timed([sys.executable, "-c", ORT, str(model)] + feed)
            file_mib = model.stat().st_size / 1048576
            print(f"{arch} {prec}: file {file_mib:.0f} MiB, weights {weights:.0f} MiB (resident {resident:.0f}), "
                  f"largest activation {act:.0f} MiB; export peak {rss_e:.0f} MiB, run peak {rss_r:.0f} MiB "
                  f"(bound {bound:.0f}; bench: at load {load:.0f}, steady {warm:.0f} -> {end:.0f}), export bound "
                  f"{bound_e:.0f} MiB, onnxruntime peak {rss_o:.0f} MiB", flush=True)
            rows.append((arch, prec, file_mib, resident, act, rss_e, bound_e, load, warm, end, rss_r, bound, rss_o))
    if rows:
        print()
        print("| architecture | precision | .onnx MiB | resident weights MiB | largest activation MiB "
              "| export peak MiB (/ bound) | peak at load MiB | steady RSS MiB | run peak MiB | run bound MiB "
              "| run / bound | onnxruntime peak MiB | run / onnxruntime |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for arch, prec, f, w, act, e, be, load, warm, end, r, b, o in rows:
            print(f"| {arch} | {prec} | {f:.0f} | {w:.0f} | {act:.0f} | {e:.0f} ({e / be:.2f}) | {load:.0f} "
                  f"| {warm:.0f} -> {end:.0f} | {r:.0f} | {b:.0f} | {r / b:.2f} | {o:.0f} | {r / o:.2f} |")


if __name__ == "__main__":
    main()
