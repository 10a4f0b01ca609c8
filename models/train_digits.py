#!/usr/bin/env python3
"""Train the small `models/digits/` PerceiverIO image classifier.

A `PerceiverForImageClassificationFourier` (transformers) is trained from
scratch on scikit-learn's `load_digits` (8x8 grey images of the digits 0-9,
1797 samples).  Everything runs on CPU in float32 and is deterministic: fixed
seeds, `torch.use_deterministic_algorithms(True)`, one intra-op thread, and a
fixed stratified train / held-out split.

    python models/train_digits.py                       # (re)writes models/digits/
    python models/train_digits.py --out DIR             # writes DIR instead
    python models/train_digits.py --check-onnx X.onnx   # held-out accuracy of an export

Preprocessing (what the model expects, see models/digits/README.md):

    x = digits.images.astype(float32) / 16.0          # [N, 8, 8], values in [0, 1]
    pixel_values = repeat(x[:, None], 3, axis=1)       # [N, 3, 8, 8] float32

`--check-onnx` runs an ONNX export (batch 1, input `pixel_values`, output
`logits`) with onnxruntime over every held-out sample, one at a time, and
compares it with the saved PyTorch checkpoint.

Written to the output directory (default models/digits/):
    config.json, model.safetensors           model.save_pretrained(...) (nothing else kept)
    samples/digit_{0..4}.npy                 first 5 held-out images, float32 [1, 3, 8, 8]
    samples/labels.json                      {"digit_0.npy": <true label>, ...}
    samples/heldout_inputs.npy               all held-out images, float32 [N, 3, 8, 8]
    samples/heldout_labels.npy               their labels, int64 [N]
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
import torch
import torch.nn.functional as F

import transformers
from transformers import PerceiverConfig, PerceiverForImageClassificationFourier

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "digits"
KEEP_FILES = {"config.json", "model.safetensors"}

SEED = 0
SPLIT_SEED = 0
TEST_SIZE = 0.25
NUM_SAMPLE_FILES = 5

# Model (kept small: ~110k parameters, ~440 KB of float32 weights).
MODEL_KWARGS = dict(
    image_size=8,
    num_latents=16,
    d_latents=64,
    num_blocks=1,
    num_self_attends_per_block=2,
    num_cross_attention_heads=1,
    num_self_attention_heads=4,
    qk_channels=32,
    v_channels=64,
    cross_attention_widening_factor=1,
    self_attention_widening_factor=1,
    attention_probs_dropout_prob=0.1,
    num_labels=10,
)

# Training.
EPOCHS = 120
BATCH_SIZE = 32
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 5
LABEL_SMOOTHING = 0.05
MAX_SHIFT = 1  # random integer translation (pixels, zero fill) for augmentation


def setup_determinism() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def load_data():
    """Return (x_train, y_train, x_test, y_test); x float32 [N,3,8,8], y int64 [N]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / np.float32(16.0)  # [1797, 8, 8] in [0, 1]
    labels = digits.target.astype(np.int64)
    x = np.ascontiguousarray(np.repeat(images[:, None, :, :], 3, axis=1))  # [1797, 3, 8, 8]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, labels, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=labels
    )
    return (np.ascontiguousarray(x_tr), np.ascontiguousarray(y_tr),
            np.ascontiguousarray(x_te), np.ascontiguousarray(y_te))


def build_config() -> PerceiverConfig:
    cfg = PerceiverConfig(**MODEL_KWARGS)
    cfg.id2label = {i: str(i) for i in range(10)}
    cfg.label2id = {str(i): i for i in range(10)}
    cfg.architectures = ["PerceiverForImageClassificationFourier"]
    return cfg


def reinit(model) -> None:
    """Re-initialise the weights for training from scratch.

    transformers' default init (every weight N(0, 0.02), latents N(0, 0.02))
    makes this small model's output almost independent of its input (the 3
    pixel channels are drowned by the 258 Fourier channels), and training
    stalls at chance level.  Xavier-uniform linear layers with zero biases and
    N(0, 1) latents / decoder query fix that.  LayerNorms keep (1, 0).
    """
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
    with torch.no_grad():
        model.perceiver.embeddings.latents.normal_(0.0, 1.0)
        model.perceiver.decoder.decoder.output_position_encodings.position_embeddings.normal_(0.0, 1.0)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate every image by an integer (dy, dx) in [-MAX_SHIFT, MAX_SHIFT], zero fill."""
    if MAX_SHIFT == 0:
        return x
    b, _, h, w = x.shape
    p = MAX_SHIFT
    padded = F.pad(x, (p, p, p, p))
    shifts = torch.randint(0, 2 * p + 1, (b, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def predict(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    outs = []
    for i in range(0, len(x), batch):
        outs.append(model(pixel_values=torch.from_numpy(x[i:i + batch])).logits.numpy())
    return np.concatenate(outs).astype(np.float32)


def train(x_tr, y_tr, x_te, y_te):
    model = PerceiverForImageClassificationFourier(build_config())
    reinit(model)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "latents" not in n
             and "position_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "latents" not in n
                and "position_embeddings" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.999),
    )
    steps_per_epoch = math.ceil(len(x_tr) / BATCH_SIZE)
    total = EPOCHS * steps_per_epoch
    warm = WARMUP_EPOCHS * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return LR * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return LR * 0.5 * (1.0 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(SEED)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    step = 0
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            xb = random_shift(xt[idx], gen)
            yb = yt[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(pixel_values=xb).logits
            loss = F.cross_entropy(logits, yb, label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            acc_te = float((predict(model, x_te).argmax(-1) == y_te).mean())
            print(f"epoch {epoch + 1:4d}  loss {loss_sum / len(xt):.4f}  "
                  f"train acc (augmented) {correct / len(xt):.4f}  held-out acc {acc_te:.4f}  "
                  f"[{time.perf_counter() - t0:.1f}s]", flush=True)
    train_s = time.perf_counter() - t0
    return model.eval(), n_params, train_s


def write_outputs(out: Path, model, x_te, y_te) -> None:
    # Start from a clean directory; only the hand-written model card survives.
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if p.name == "README.md":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    model.save_pretrained(out, safe_serialization=True)
    for p in out.iterdir():  # keep only config.json + model.safetensors (+ README.md)
        if p.name not in KEEP_FILES | {"README.md"}:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    samples = out / "samples"
    samples.mkdir()
    labels = {}
    for i in range(NUM_SAMPLE_FILES):
        name = f"digit_{i}.npy"
        np.save(samples / name, np.ascontiguousarray(x_te[i:i + 1], dtype=np.float32))
        labels[name] = int(y_te[i])
    (samples / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    np.save(samples / "heldout_inputs.npy", np.ascontiguousarray(x_te, dtype=np.float32))
    np.save(samples / "heldout_labels.npy", np.ascontiguousarray(y_te, dtype=np.int64))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(d: Path):
    return PerceiverForImageClassificationFourier.from_pretrained(d).eval()


def cmd_train(out: Path) -> None:
    setup_determinism()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    x_tr, y_tr, x_te, y_te = load_data()
    print(f"train {len(x_tr)}  held-out {len(x_te)}  (stratified, random_state={SPLIT_SEED})")
    model, n_params, train_s = train(x_tr, y_tr, x_te, y_te)
    logits = predict(model, x_te)
    acc = float((logits.argmax(-1) == y_te).mean())
    write_outputs(out, model, x_te, y_te)

    # Reload from disk: the saved checkpoint must reproduce the in-memory model.
    reloaded = load_checkpoint(out)
    logits2 = predict(reloaded, np.load(out / "samples" / "heldout_inputs.npy"))
    assert np.array_equal(logits, logits2), "reloaded checkpoint differs"

    n_err = int((logits.argmax(-1) != y_te).sum())
    print(f"parameters {n_params}  model.safetensors {(out / 'model.safetensors').stat().st_size} bytes")
    print(f"training time {train_s:.1f}s")
    print(f"held-out accuracy (PyTorch f32) {acc:.4f}  ({len(y_te) - n_err}/{len(y_te)})")
    print(f"sha256 model.safetensors {sha256(out / 'model.safetensors')}")
    print(f"sha256 held-out logits   {hashlib.sha256(logits.tobytes()).hexdigest()}")


def cmd_check_onnx(onnx_path: Path, ckpt: Path) -> None:
    import onnxruntime as ort

    torch.set_num_threads(1)
    x = np.load(ckpt / "samples" / "heldout_inputs.npy")
    y = np.load(ckpt / "samples" / "heldout_labels.npy")
    ref = predict(load_checkpoint(ckpt), x)

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    out_name = sess.get_outputs()[0].name
    print(f"onnx input {inp.name} {inp.shape}  output {out_name} {sess.get_outputs()[0].shape}")
    got = np.concatenate([sess.run([out_name], {inp.name: x[i:i + 1]})[0] for i in range(len(x))])

    acc_onnx = float((got.argmax(-1) == y).mean())
    acc_torch = float((ref.argmax(-1) == y).mean())
    agree = int((got.argmax(-1) == ref.argmax(-1)).sum())
    print(f"held-out samples {len(y)}")
    print(f"held-out accuracy PyTorch f32     {acc_torch:.4f}")
    print(f"held-out accuracy ONNX (ort, b=1) {acc_onnx:.4f}")
    print(f"argmax agreement {agree}/{len(y)}")
    print(f"max |logit_onnx - logit_torch| {float(np.abs(got - ref).max()):.3e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to write/read")
    ap.add_argument("--check-onnx", type=Path, metavar="ONNX",
                    help="do not train: evaluate this ONNX export on the held-out set of --out")
    args = ap.parse_args()
    if args.check_onnx:
        cmd_check_onnx(args.check_onnx, args.out)
    else:
        cmd_train(args.out)


if __name__ == "__main__":
    sys.exit(main())
