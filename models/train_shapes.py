#!/usr/bin/env python3
"""Train the `models/shapes/` PerceiverIO image classifier (32x32 colour, conv front end).

A `PerceiverForImageClassificationConvProcessing` (transformers; the architecture of deepmind's
vision-perceiver-conv at a small size) is trained from scratch on synthetic 32x32 RGB images of
ten shapes (rendered here, no downloads): random colours, sizes, positions and small rotations, a
lighting gradient, sensor noise and, in half the images, a distractor stroke. Everything runs on
CPU in float32 and is deterministic (fixed seeds, `torch.use_deterministic_algorithms(True)`, one
intra-op thread by default).

    python models/train_shapes.py                        # (re)writes models/shapes/
    python models/train_shapes.py --out DIR              # writes DIR instead
    python models/train_shapes.py --heldout X.npy [--labels Y.npy]   # write the held-out set
    python models/train_shapes.py --check-onnx M.onnx   # held-out accuracy of an export (ort)
    python models/train_shapes.py --samples-only         # rewrite samples/ from the checkpoint

Input: `pixel_values` float32 [B, 3, 32, 32], RGB in [0, 1] (no normalisation). Output: `logits`
[B, 10], classes in `CLASSES` order.

Training draws PER_EPOCH fresh images per epoch from numpy.random.default_rng(epoch); the
held-out set is HELDOUT images from default_rng(12345), never used for training or model
selection (the weights are those after the last epoch). Calibration data for `distill` / `tune`
comes from other seeds (models/make_calibration.py shapes, seed 7).

Written to the output directory (default models/shapes/): config.json, model.safetensors
(model.save_pretrained), samples/shape_{0..4}.npy [1, 3, 32, 32] (the first held-out images),
samples/logits_{0..4}.npy [1, 10] (PyTorch's outputs for them) and samples/labels.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "shapes"
KEEP_FILES = {"config.json", "model.safetensors"}

CLASSES = ["disk", "ring", "square", "frame", "triangle", "plus", "cross", "diamond", "crescent",
           "dots"]
SIZE = 32
SEED = 0
HELDOUT_SEED = 12345
HELDOUT = 2000
NUM_SAMPLE_FILES = 5

# Model: N=64 latents of D=128, one self-attention layer per block, the block applied twice
# (weight-shared), the conv front end (7x7 stride-2 conv + 3x3 stride-2 max pool: 7x7 = 49 tokens
# of 64 channels, plus 258 Fourier position channels = d_model 322).
MODEL_KWARGS = dict(
    image_size=SIZE,
    d_model=322,
    num_latents=64,
    d_latents=128,
    num_blocks=2,
    num_self_attends_per_block=1,
    num_cross_attention_heads=1,
    num_self_attention_heads=4,
    cross_attention_widening_factor=1,
    self_attention_widening_factor=1,
    attention_probs_dropout_prob=0.0,
    num_labels=len(CLASSES),
)

EPOCHS = 24
PER_EPOCH = 8192
BATCH_SIZE = 64
LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1
LABEL_SMOOTHING = 0.05


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _box(px, py, bx, by):
    qx, qy = np.abs(px) - bx, np.abs(py) - by
    out = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return out + np.minimum(np.maximum(qx, qy), 0)


def _rot(px, py, a):
    c, s = np.cos(a), np.sin(a)
    return c * px + s * py, -s * px + c * py


def _triangle(px, py, r):
    k = math.sqrt(3.0)
    px = np.abs(px) - r
    py = py + r / k
    flip = px + k * py > 0
    nx = np.where(flip, (px - k * py) / 2, px)
    ny = np.where(flip, (-k * px - py) / 2, py)
    nx = nx - np.clip(nx, -2 * r, 0)
    return -np.hypot(nx, ny) * np.sign(ny)


def _sdf(cls, px, py, r):
    """Signed distance (pixels, negative inside) of shape `cls` of size r at local coords."""
    name = CLASSES[cls]
    if name == "disk":
        return np.hypot(px, py) - r
    if name == "ring":
        return np.abs(np.hypot(px, py) - 0.72 * r) - 0.28 * r
    if name == "square":
        return _box(px, py, 0.8 * r, 0.8 * r)
    if name == "frame":
        return np.abs(_box(px, py, 0.8 * r, 0.8 * r) + 0.1 * r) - 0.2 * r
    if name == "triangle":
        return _triangle(px, py, r)
    if name == "plus":
        return np.minimum(_box(px, py, r, 0.25 * r), _box(px, py, 0.25 * r, r))
    if name == "cross":
        qx, qy = _rot(px, py, math.pi / 4)
        return np.minimum(_box(qx, qy, r, 0.25 * r), _box(qx, qy, 0.25 * r, r))
    if name == "diamond":
        qx, qy = _rot(px, py, math.pi / 4)
        return _box(qx, qy, 0.68 * r, 0.68 * r)
    if name == "crescent":
        return np.maximum(np.hypot(px, py) - r, -(np.hypot(px - 0.45 * r, py) - 0.8 * r))
    if name == "dots":
        return np.minimum(np.hypot(px - 0.55 * r, py) - 0.4 * r, np.hypot(px + 0.55 * r, py) - 0.4 * r)
    raise ValueError(name)


FREE_ROTATION = {"disk", "ring", "crescent", "dots"}


def render(rng: np.random.Generator, n: int):
    """n images float32 [n, 3, 32, 32] in [0, 1] and their labels int64 [n]."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    labels = rng.integers(0, len(CLASSES), n)
    out = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i in range(n):
        cls = int(labels[i])
        r = rng.uniform(5.0, 10.0)
        cx, cy = rng.uniform(r + 1, SIZE - 2 - r, 2)
        a = rng.uniform(0, 2 * math.pi) if CLASSES[cls] in FREE_ROTATION else rng.uniform(-0.26, 0.26)
        px, py = _rot(xs - cx, ys - cy, a)
        cover = np.clip(0.5 - _sdf(cls, px, py, r), 0.0, 1.0)
        bg = rng.uniform(0.0, 1.0, 3)
        while True:
            fg = rng.uniform(0.0, 1.0, 3)
            if np.linalg.norm(fg - bg) > 0.45:
                break
        g = rng.uniform(-0.15, 0.15, (3, 2))
        img = bg[:, None, None] + (g[:, 0, None, None] * (xs - 15.5) + g[:, 1, None, None] * (ys - 15.5)) / 16
        img = img * (1 - cover) + fg[:, None, None] * cover
        if rng.random() < 0.5:  # a distractor stroke of another colour
            p0, p1 = rng.uniform(0, SIZE - 1, 2), rng.uniform(0, SIZE - 1, 2)
            d = p1 - p0
            t = np.clip(((xs - p0[0]) * d[0] + (ys - p0[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
            dist = np.hypot(xs - p0[0] - t * d[0], ys - p0[1] - t * d[1])
            c2 = np.clip(0.5 - (dist - rng.uniform(0.4, 0.9)), 0, 1)
            img = img * (1 - c2) + rng.uniform(0, 1, 3)[:, None, None] * c2
        img = img + rng.normal(0, rng.uniform(0.02, 0.08), img.shape)
        out[i] = np.clip(img, 0, 1)
    return out, labels.astype(np.int64)


def heldout():
    return render(np.random.default_rng(HELDOUT_SEED), HELDOUT)


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------

def setup_determinism(threads: int) -> None:
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def build_config():
    from transformers import PerceiverConfig

    cfg = PerceiverConfig(**MODEL_KWARGS)
    cfg.id2label = dict(enumerate(CLASSES))
    cfg.label2id = {c: i for i, c in enumerate(CLASSES)}
    cfg.architectures = ["PerceiverForImageClassificationConvProcessing"]
    return cfg


def reinit(model) -> None:
    """Xavier-uniform linear layers with zero biases, N(0, 1) latents and decoder query (the
    default N(0, 0.02) init makes the small model's output nearly input-independent, as for
    models/digits); LayerNorms, the conv and its batch norm keep their defaults."""
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    with torch.no_grad():
        model.perceiver.embeddings.latents.normal_(0.0, 1.0)
        model.perceiver.decoder.decoder.output_position_encodings.position_embeddings.normal_(0.0, 1.0)


def predict(model, x: np.ndarray, batch: int = 250) -> np.ndarray:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(pixel_values=torch.from_numpy(x[i:i + batch])).logits.numpy())
    return np.concatenate(outs).astype(np.float32)


def train(x_te, y_te, epochs: int):
    import torch
    import torch.nn.functional as F
    from transformers import PerceiverForImageClassificationConvProcessing

    model = PerceiverForImageClassificationConvProcessing(build_config())
    reinit(model)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "latents" not in n
             and "position_embeddings" not in n]
    ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    steps_per_epoch = PER_EPOCH // BATCH_SIZE
    total = epochs * steps_per_epoch
    warm = WARMUP_EPOCHS * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return LR * (step + 1) / warm
        return LR * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        x, y = render(np.random.default_rng(epoch), PER_EPOCH)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        model.train()
        loss_sum, correct = 0.0, 0
        for i in range(0, PER_EPOCH, BATCH_SIZE):
            xb, yb = xt[i:i + BATCH_SIZE], yt[i:i + BATCH_SIZE]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(pixel_values=xb).logits
            loss = F.cross_entropy(logits, yb, label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(-1) == yb).sum())
        acc_te = float((predict(model, x_te).argmax(-1) == y_te).mean())
        print(f"epoch {epoch + 1:3d}  loss {loss_sum / PER_EPOCH:.4f}  train acc {correct / PER_EPOCH:.4f}"
              f"  held-out acc {acc_te:.4f}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    return model.eval(), n_params, time.perf_counter() - t0


def write_outputs(out: Path, model, x_te, y_te) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name != "README.md":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    model.save_pretrained(out, safe_serialization=True)
    for p in out.iterdir():
        if p.name not in KEEP_FILES | {"README.md"}:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    write_samples(out, model, x_te, y_te)


def write_samples(out: Path, model, x_te, y_te) -> None:
    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    samples.mkdir()
    labels = {}
    for i in range(NUM_SAMPLE_FILES):
        name = f"shape_{i}.npy"
        np.save(samples / name, np.ascontiguousarray(x_te[i:i + 1]))
        np.save(samples / f"logits_{i}.npy", predict(model, x_te[i:i + 1]))
        labels[name] = CLASSES[int(y_te[i])]
    (samples / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


def cmd_train(out: Path, epochs: int, threads: int) -> None:
    import torch
    import transformers
    from transformers import PerceiverForImageClassificationConvProcessing

    setup_determinism(threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    x_te, y_te = heldout()
    model, n_params, train_s = train(x_te, y_te, epochs)
    logits = predict(model, x_te)
    acc = float((logits.argmax(-1) == y_te).mean())
    write_outputs(out, model, x_te, y_te)
    again = predict(PerceiverForImageClassificationConvProcessing.from_pretrained(out), x_te)
    assert np.array_equal(logits, again), "reloaded checkpoint differs"
    print(f"parameters {n_params}  model.safetensors {(out / 'model.safetensors').stat().st_size} bytes")
    print(f"training time {train_s:.0f}s")
    print(f"held-out accuracy (PyTorch f32) {acc:.4f} ({int((logits.argmax(-1) == y_te).sum())}/{len(y_te)})")
    print(f"sha256 model.safetensors {hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()}")


def cmd_check_onnx(onnx_path: Path, ckpt: Path) -> None:
    import onnxruntime as ort
    import torch
    from transformers import PerceiverForImageClassificationConvProcessing

    torch.set_num_threads(1)
    x, y = heldout()
    ref = predict(PerceiverForImageClassificationConvProcessing.from_pretrained(ckpt), x)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    got = np.concatenate([sess.run([out], {inp: x[i:i + 1]})[0] for i in range(len(x))])
    print(f"held-out images {len(y)}")
    print(f"held-out accuracy PyTorch f32     {float((ref.argmax(-1) == y).mean()):.4f}")
    print(f"held-out accuracy ONNX (ort, b=1) {float((got.argmax(-1) == y).mean()):.4f}")
    print(f"max |logit_onnx - logit_torch| {float(np.abs(got - ref).max()):.3e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--heldout", type=Path, metavar="X.npy", help="write the held-out images and stop")
    ap.add_argument("--labels", type=Path, metavar="Y.npy", help="with --heldout: their labels")
    ap.add_argument("--check-onnx", type=Path, metavar="ONNX")
    ap.add_argument("--samples-only", action="store_true", help="rewrite --out/samples from its checkpoint")
    a = ap.parse_args()
    if a.samples_only:
        from transformers import PerceiverForImageClassificationConvProcessing

        setup_determinism(1)
        x, y = heldout()
        write_samples(a.out, PerceiverForImageClassificationConvProcessing.from_pretrained(a.out), x, y)
        return
    if a.heldout:
        x, y = heldout()
        np.save(a.heldout, x)
        if a.labels:
            np.save(a.labels, y)
        print(f"{a.heldout}: {list(x.shape)} held-out images (seed {HELDOUT_SEED})")
    elif a.check_onnx:
        cmd_check_onnx(a.check_onnx, a.out)
    else:
        cmd_train(a.out, a.epochs, a.threads)


if __name__ == "__main__":
    sys.exit(main())
