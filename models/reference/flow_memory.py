#!/usr/bin/env python3
"""Memory of the optical-flow architecture (issue #12): file size, peak RSS of `export` and
`run`, and whether the onnx checker and onnxruntime read the file, for the default export
(`--tables auto`) and for `--tables all --external-data`.

    python models/reference/flow_memory.py --bin target/release/perceiver-edge \
        --checkpoint /work/flow-ck --work /tmp/flow-mem

The checkpoint is generated on demand (random weights, never committed): transformers'
PerceiverForOpticalFlow with deepmind/optical-flow-perceiver's configuration (41 M
parameters, train_size 368x496, 2048 latents x 512, d_model 322, 1 block x 24 self-attention
layers, 16 self-attention heads, 1 cross-attention head). Generating needs torch and
transformers; the checks need numpy, onnx and onnxruntime. Peak RSS is `/usr/bin/time -v`'s
"Maximum resident set size". Prints one line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(ck: Path) -> None:
    """Writes config.json + model.safetensors of the deepmind flow architecture, random weights."""
    import torch
    from transformers import PerceiverConfig, PerceiverForOpticalFlow

    torch.manual_seed(0)
    cfg = PerceiverConfig(
        num_latents=2048,
        d_latents=512,
        d_model=322,
        num_blocks=1,
        num_self_attends_per_block=24,
        num_self_attention_heads=16,
        num_cross_attention_heads=1,
        qk_channels=None,
        v_channels=None,
        cross_attention_shape_for_attention="kv",
        self_attention_widening_factor=1,
        cross_attention_widening_factor=1,
        hidden_act="gelu",
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        use_query_residual=True,
        train_size=[368, 496],
    )
    model = PerceiverForOpticalFlow(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(ck, safe_serialization=True)
    print(f"generated {ck} ({n / 1e6:.1f} M parameters)")


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Runs `cmd` under /usr/bin/time -v: (peak RSS in MiB, seconds, stdout)."""
    t = time.time()
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
    return rss, time.time() - t, r.stdout


def mib(p: Path) -> float:
    return p.stat().st_size / 1048576 if p.exists() else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="perceiver-edge binary (release build)")
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (generated if missing)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the exports, inputs and outputs")
    ap.add_argument("--modes", default="default,all", help="default (auto tables) and/or all (--tables all --external-data)")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnx checker and onnxruntime")
    a = ap.parse_args()
    if not (a.checkpoint / "model.safetensors").is_file():
        generate(a.checkpoint)
    a.work.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((1, 2, 27, 368, 496)).astype(np.float32)
    inp = a.work / "inputs.npy"
    np.save(inp, x)
    modes = {"default": [], "all": ["--tables", "all", "--external-data"]}
    rows = []
    for mode in a.modes.split(","):
        onnx_path = a.work / f"flow-{mode}.onnx"
        data = Path(str(onnx_path) + ".data")
        for p in (onnx_path, data):
            p.unlink(missing_ok=True)
        rss_e, t_e, said = timed([a.bin, "export", str(a.checkpoint), "-o", str(onnx_path)] + modes[mode])
        tables = [l.strip() for l in said.splitlines() if l.strip().startswith("table")]
        print(f"[{mode}] export: peak RSS {rss_e:.0f} MiB, {t_e:.0f} s; file {mib(onnx_path):.1f} MiB"
              f" + external data {mib(data):.1f} MiB")
        for l in tables:
            print(f"[{mode}]   {l}")
        out = a.work / f"flow-{mode}.out.npy"
        rss_r, t_r, _ = timed([a.bin, "run", str(onnx_path), "-i", str(inp), "-o", str(out)])
        print(f"[{mode}] run: peak RSS {rss_r:.0f} MiB, {t_r:.0f} s")
        checker = ort_ok = "-"
        diff = float("nan")
        if not a.no_ort:
            import onnx
            import onnxruntime as ort

            onnx.checker.check_model(str(onnx_path), full_check=True)
            checker = "ok"
            s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            y = s.run(None, {s.get_inputs()[0].name: x})[0]
            diff = float(np.abs(y - np.load(out)).max())
            ort_ok = "ok"
            del s
            print(f"[{mode}] onnx.checker full_check ok; onnxruntime ok, max |ort - tract| = {diff:.2e}")
        rows.append((mode, mib(onnx_path), mib(data), rss_e, rss_r, checker, ort_ok, diff))
    print()
    print("| mode | .onnx MiB | .data MiB | export peak RSS MiB | run peak RSS MiB | onnx checker | onnxruntime | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for m, f, d, e, r, c, o, diff in rows:
        print(f"| {m} | {f:.1f} | {d:.1f} | {e:.0f} | {r:.0f} | {c} | {o} | {diff:.2e} |")


if __name__ == "__main__":
    main()
