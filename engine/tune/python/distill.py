#!/usr/bin/env python3
"""Recover a pruned PerceiverIO budget by distillation (called by `perceiver-edge distill`).

The teacher is a checkpoint in Hugging Face layout; the student is the same transformers class
with `num_latents = len(--kept)` and `num_blocks = --blocks`, built by copying the teacher's
weights (the kept rows of the latent array, every other weight as is: the latent blocks are
weight-shared, so fewer blocks only repeat them fewer times). It is then trained to match the
teacher on the calibration inputs (`--data`, a stacked .npy shaped like the model input):

* classification logits (`[B, C]`, or per token `[B, L, V]`): KL(teacher || student) of the
  temperature-softened distributions, times T^2;
* a one-channel map `[B, P, 1]` (a heat map read out by its peak, as models/marker):
  KL(teacher || student) of the softmax over the P positions (the distribution the read-out
  uses), plus their MSE;
* other outputs (flow, multi-channel decoders): mean squared error;
* `--loss kl|map-kl|mse` overrides the choice;
* `--feature-weight W`: plus W times the MSE between the student's latents after the encoder and
  the teacher's kept rows;
* `--labels L.npy`: int64 class labels (classifiers): plus the cross-entropy with them; float32
  target outputs shaped like the model's output: for a one-channel map, plus the cross-entropy of
  the student's softmax with the target distribution (each row normalised; the loss a heat-map
  locator is trained with), for other outputs plus the MSE with them.

Augmentation by input kind: images `[B, C, H, W]` a random integer shift of up to one pixel (zero
fill, a crop of the padded image) and Gaussian noise (no flips: a flipped digit can change class);
token ids (int64): 15 % replaced by the mask id; other float inputs: Gaussian noise on the
entries that vary across the calibration set (entries equal in every sample, such as the position
features a bare model's raw tokens carry, stay exact: noise there would move every position).

Deterministic for a given `--seed` on one machine: seeded generators, deterministic algorithms,
one CPU thread. Uses CUDA when torch sees a GPU (`--device auto`), else the CPU.

Protocol with the caller: progress as JSON lines on stdout (`{"event": "start", ...}`, `"step"`,
`"epoch"`, `"done"`); on failure one line `error: ...` on stderr and exit status 2. Writes
config.json, model.safetensors (and a bare model's perceiver_edge_decoder.json) and
distill.json into `--out`, which must exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SIDECAR = "perceiver_edge_decoder.json"
MASK_ID = 3  # PerceiverTokenizer's [MASK]
# Heads the student can be built for, and the keyword their forward takes.
HEADS = {
    "PerceiverForImageClassificationLearned": "pixel_values",
    "PerceiverForImageClassificationFourier": "pixel_values",
    "PerceiverForImageClassificationConvProcessing": "pixel_values",
    "PerceiverForSequenceClassification": "inputs",
    "PerceiverForMaskedLM": "inputs",
    "PerceiverForOpticalFlow": "inputs",
    "PerceiverModel": "inputs",
}


class Fail(Exception):
    pass


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def load(teacher: Path):
    import torch
    import transformers
    from transformers import PerceiverConfig

    cfg = PerceiverConfig.from_pretrained(teacher)
    arch = (cfg.architectures or [""])[0]
    if arch not in HEADS:
        raise Fail(f"{teacher / 'config.json'}: head {arch!r} has no recovery (expected one of {', '.join(HEADS)})")
    if arch == "PerceiverModel":
        return cfg, arch, lambda c: bare_model(c, teacher)
    cls = getattr(transformers, arch)
    return cfg, arch, lambda c: cls(c)


def bare_model(cfg, teacher: Path):
    """A bare PerceiverModel with the basic Fourier-query decoder its sidecar declares."""
    from transformers import PerceiverModel
    from transformers.models.perceiver.modeling_perceiver import PerceiverBasicDecoder

    side = teacher / SIDECAR
    if not side.is_file():
        raise Fail(f"{side}: a bare PerceiverModel needs its decoder declaration for recovery")
    d = json.loads(side.read_text())
    if d.get("type") != "basic" or d.get("position_encoding") != "fourier":
        raise Fail(f"{side}: recovery supports basic decoders with Fourier queries (type {d.get('type')!r})")
    dec = PerceiverBasicDecoder(
        cfg,
        output_num_channels=d["output_num_channels"],
        output_index_dims=d["output_index_dims"],
        num_channels=d["num_channels"],
        qk_channels=d.get("qk_channels"),
        v_channels=d.get("v_channels"),
        num_heads=d.get("num_heads", 1),
        widening_factor=d.get("widening_factor", 1),
        use_query_residual=d.get("use_query_residual", False),
        final_project=d.get("final_project", True),
        position_encoding_type="fourier",
        fourier_position_encoding_kwargs=dict(d["fourier"]),
    )
    return PerceiverModel(cfg, decoder=dec)


def forward(model, arch: str, x):
    """The model's main output for input batch x (a bare model decodes its declared grid)."""
    import torch

    if arch == "PerceiverModel":
        dec = model.decoder
        model.decoder = None
        try:
            z = model(inputs=x).last_hidden_state
        finally:
            model.decoder = dec
        dummy = torch.zeros([x.shape[0], 1] + list(dec.output_index_dims), dtype=x.dtype, device=x.device)
        return dec(dec.decoder_query(dummy), z).logits
    return model(**{HEADS[arch]: x}).logits


def encoder_of(model, arch: str):
    return model.encoder if arch == "PerceiverModel" else model.perceiver.encoder


def latents_key(state: dict) -> str:
    keys = [k for k in state if k.endswith("embeddings.latents")]
    if len(keys) != 1:
        raise Fail(f"expected one latent array in the checkpoint, found {keys}")
    return keys[0]


def augment(x, gen, varies=None, shift=True):
    import torch
    import torch.nn.functional as F

    if not x.is_floating_point():
        mask = torch.rand(x.shape, generator=gen, device=x.device) < 0.15
        return torch.where(mask, torch.full_like(x, MASK_ID), x)
    if x.dim() == 4 and shift:
        b, _, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1))
        shifts = torch.randint(0, 3, (b, 2), generator=gen, device=x.device)
        out = torch.stack([padded[i, :, int(s[0]):int(s[0]) + h, int(s[1]):int(s[1]) + w] for i, s in enumerate(shifts)])
        return out + 0.02 * torch.randn(out.shape, generator=gen, device=x.device)
    noise = 0.02 * torch.randn(x.shape, generator=gen, device=x.device)
    return x + (noise if varies is None else noise * varies)


def is_classification(arch: str) -> bool:
    return arch not in ("PerceiverModel", "PerceiverForOpticalFlow")


def top1(y):
    """Arg-max per sample ([B, C]) or per position ([B, L, V]); a one-channel map: its peak."""
    if y.dim() == 3 and y.shape[-1] == 1:
        return y[..., 0].argmax(-1)
    return y.argmax(-1)


def agreement(a, b) -> float:
    return float((top1(a) == top1(b)).float().mean())


def run(a) -> dict:
    import torch
    import torch.nn.functional as F

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(a.seed)
    np.random.seed(a.seed)
    torch.manual_seed(a.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if a.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = a.device
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cfg, arch, make = load(a.teacher)
    from safetensors.torch import load_file

    state = load_file(str(a.teacher / "model.safetensors"))
    teacher = make(cfg)
    teacher.load_state_dict(state, strict=True)
    kept = [int(k) for k in a.kept.split(",")] if a.kept else list(range(cfg.num_latents))
    n = cfg.num_latents
    if not kept or any(k < 0 or k >= n for k in kept) or sorted(set(kept)) != kept:
        raise Fail(f"--kept {a.kept}: expected ascending distinct latent indices in 0..{n - 1}")
    scfg = type(cfg).from_dict(cfg.to_dict())
    scfg.num_latents = len(kept)
    scfg.num_blocks = a.blocks
    scfg.architectures = [arch]
    student = make(scfg)
    sstate = dict(state)
    lk = latents_key(sstate)
    sstate[lk] = state[lk][kept].clone()
    student.load_state_dict(sstate, strict=True)
    if a.init:
        # More training for a student distill wrote before: its weights, same budget.
        init = load_file(str(a.init))
        want = {k: tuple(v.shape) for k, v in student.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in init.items()}
        if got != want:
            diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
            raise Fail(f"--init {a.init.parent}: not a student of this budget ({len(kept)} latents, "
                       f"{a.blocks} blocks): tensor {diff[0]} differs")
        student.load_state_dict(init, strict=True)

    x_all = torch.from_numpy(np.load(a.data))
    labels = targets = None
    if a.labels:
        raw = np.load(a.labels)
        if np.issubdtype(raw.dtype, np.floating):
            targets = torch.from_numpy(raw.astype(np.float32))
            if len(targets) != len(x_all) or not torch.isfinite(targets).all():
                raise Fail(f"{a.labels}: expected {len(x_all)} finite target outputs, one per sample")
        else:
            labels = torch.from_numpy(raw).long()
            if labels.dim() != 1 or len(labels) != len(x_all):
                raise Fail(f"{a.labels}: expected {len(x_all)} int64 labels, one per sample")
            if not is_classification(arch):
                raise Fail(f"--labels: {arch} is not a classifier; give float32 target outputs shaped like its output")
    teacher.to(device).eval()
    student.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)

    feats = {}
    if a.feature_weight > 0:
        encoder_of(teacher, arch).register_forward_hook(lambda m, i, o: feats.__setitem__("t", o.last_hidden_state))
        encoder_of(student, arch).register_forward_hook(lambda m, i, o: feats.__setitem__("s", o.last_hidden_state))
    kept_t = torch.tensor(kept, device=device)

    def outputs(model, x, bs=256):
        model.eval()
        with torch.no_grad():
            return torch.cat([forward(model, arch, x[i:i + bs].to(device)).float() for i in range(0, len(x), bs)])

    t_all = outputs(teacher, x_all)
    before = agreement(outputs(student, x_all), t_all)

    cls = is_classification(arch)
    kind = a.loss
    if kind == "auto":
        kind = "kl" if cls else ("map-kl" if t_all.dim() == 3 and t_all.shape[-1] == 1 else "mse")
    if kind == "kl" and not cls:
        raise Fail(f"--loss kl: {arch} has no class logits (use mse or map-kl)")
    if kind == "map-kl" and not (t_all.dim() == 3 and t_all.shape[-1] == 1):
        raise Fail(f"--loss map-kl: the output {list(t_all.shape)} is not a one-channel map [B, P, 1]")
    if targets is not None:
        if kind == "kl":
            raise Fail(f"--labels {a.labels}: float target outputs apply to maps and regression outputs; "
                       f"{arch} takes int64 class labels")
        if targets[0].numel() != t_all[0].numel():
            raise Fail(f"--labels {a.labels}: target outputs {list(targets.shape)}, expected "
                       f"{[len(x_all)] + list(t_all.shape[1:])} (one model output per sample)")
        targets = targets.reshape(t_all.shape)
        if kind == "map-kl":
            if (targets < 0).any() or (targets.sum(1) <= 0).any():
                raise Fail(f"--labels {a.labels}: a map target must be a non-negative distribution per sample")
            targets = targets / targets.sum(1, keepdim=True)
    T = a.temperature
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(x_all) / a.batch_size)
    total = a.epochs * steps_per_epoch
    warm = min(steps_per_epoch, max(1, total // 20))
    # Raw float tokens: noise only where the data varies (not on input-independent position features).
    varies = None
    if x_all.is_floating_point() and x_all.dim() == 3:
        varies = (x_all.amax(0) != x_all.amin(0)).to(device=device, dtype=x_all.dtype)
    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    agen = torch.Generator(device=device).manual_seed(a.seed)
    emit(event="start", steps=total, epochs=a.epochs, device=device, samples=len(x_all), head=arch,
         agreement_before=before)
    losses = []
    step = 0
    t0 = time.time()
    for epoch in range(a.epochs):
        student.train()
        order = torch.randperm(len(x_all), generator=gen)
        run_loss = 0.0
        for i in range(0, len(x_all), a.batch_size):
            idx = order[i:i + a.batch_size]
            # A shift would move the image away from its target output: noise only then.
            x = augment(x_all[idx].to(device), agen, varies, shift=targets is None)
            with torch.no_grad():
                t = forward(teacher, arch, x)
                ft = feats.get("t")
            s = forward(student, arch, x)
            if kind == "kl":
                loss = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                                reduction="batchmean" if s.dim() == 2 else "none")
                if s.dim() != 2:
                    loss = loss.sum(-1).mean()
                loss = loss * T * T
                if labels is not None:
                    loss = loss + F.cross_entropy(s, labels[idx].to(device))
            elif kind == "map-kl":
                loss = F.kl_div(F.log_softmax(s[..., 0], -1), F.log_softmax(t[..., 0], -1), log_target=True,
                                reduction="batchmean") + F.mse_loss(s, t)
                if targets is not None:
                    loss = loss - (targets[idx].to(device)[..., 0] * F.log_softmax(s[..., 0], -1)).sum(-1).mean()
            else:
                loss = F.mse_loss(s, t)
                if targets is not None:
                    loss = loss + F.mse_loss(s, targets[idx].to(device))
            if a.feature_weight > 0:
                loss = loss + a.feature_weight * F.mse_loss(feats["s"], ft.index_select(1, kept_t))
            v = float(loss.detach())
            if not math.isfinite(v):
                raise Fail(f"the training loss became non-finite ({v}) at epoch {epoch + 1}, step {step + 1}; "
                           f"lower --lr (was {a.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            lr = a.lr * (step + 1) / warm if step < warm else \
                0.5 * a.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            step += 1
            run_loss += v * len(idx)
            emit(event="step", step=step, epoch=epoch + 1, loss=v)
        losses.append(run_loss / len(x_all))
        emit(event="epoch", epoch=epoch + 1, loss=losses[-1])
        if not all(math.isfinite(float(p.detach().abs().max())) for p in student.parameters()):
            raise Fail(f"the student's weights became non-finite at epoch {epoch + 1}; lower --lr (was {a.lr:g})")

    s_all = outputs(student, x_all)
    after = agreement(s_all, t_all)
    student.to("cpu").eval()
    student.save_pretrained(a.out, safe_serialization=True)
    for p in a.out.iterdir():
        if p.name not in {"config.json", "model.safetensors"}:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if arch == "PerceiverModel":
        shutil.copyfile(a.teacher / SIDECAR, a.out / SIDECAR)
    import torch as _t
    import transformers

    record = {
        "teacher": str(a.teacher),
        "head": arch,
        "latents": len(kept),
        "teacher_latents": n,
        "blocks": a.blocks,
        "teacher_blocks": cfg.num_blocks,
        "kept_latents": kept,
        "epochs": a.epochs,
        "seed": a.seed,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "temperature": T if kind == "kl" else None,
        "loss": kind,
        "feature_weight": a.feature_weight,
        "init": str(a.init.parent) if a.init else None,
        "labels": str(a.labels) if a.labels else None,
        "calibration_samples": len(x_all),
        "epoch_losses": losses,
        "agreement_with_teacher": {
            "on": "the calibration inputs, unaugmented (transformers)",
            # Where training started: the pruned teacher, or the --init student.
            ("init" if a.init else "pruned"): before,
            "recovered": after,
        },
        "output_mse_with_teacher": {
            "recovered": float(((s_all - t_all) ** 2).mean()),
        },
        "device": device,
        "seconds": round(time.time() - t0, 1),
        "versions": {"torch": _t.__version__, "transformers": transformers.__version__},
    }
    (a.out / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    emit(event="done", agreement_before=before, agreement_after=after, loss=losses[-1] if losses else None)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--labels", type=Path)
    ap.add_argument("--init", type=Path, help="start from this student's model.safetensors")
    ap.add_argument("--kept", default="", help="kept latent indices, comma-separated, ascending")
    ap.add_argument("--blocks", type=int, required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--feature-weight", type=float, default=0.0)
    ap.add_argument("--loss", default="auto", choices=["auto", "kl", "map-kl", "mse"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args()
    try:
        run(a)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # a bug or an environment problem: still one line
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: training failed: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
