#!/usr/bin/env python3
"""Generate the numerical reference fixtures for perceiver-edge.

Every fixture is a tiny random-weight PerceiverIO checkpoint (one per head
type) plus inputs and the outputs that Hugging Face transformers computes for
them.  The Rust exporter test exports each fixture case to ONNX and compares
against the expected outputs; check_onnxruntime.py does the same with
onnxruntime.

    python make_fixtures.py            # regenerates models/reference/fixtures/

Layout of fixtures/<name>/:
    config.json, model.safetensors     model.save_pretrained(...) output
    perceiver_edge_decoder.json        decoder sidecar (bare PerceiverModel only)
    <case>.in.<name>.npy               graph inputs (C-contiguous, f32 / i64)
    <case>.out.<name>.npy              expected graph outputs
    fixture.json                       description + cases (see README.md)

Determinism: each fixture seeds torch (weights) and numpy (inputs) with its own
seed; everything runs on CPU in float32, model.eval(), torch.no_grad().
transformers' modeling_perceiver.py is the numerical authority.  Where its
public forward() cannot produce a result (see README.md, "transformers
quirks"), the expected values are computed by calling transformers' own
decoder modules directly, never by re-implementing the maths here.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import transformers
from transformers import (
    PerceiverConfig,
    PerceiverForImageClassificationConvProcessing,
    PerceiverForImageClassificationFourier,
    PerceiverForImageClassificationLearned,
    PerceiverForMaskedLM,
    PerceiverForMultimodalAutoencoding,
    PerceiverForOpticalFlow,
    PerceiverForSequenceClassification,
    PerceiverModel,
)
from transformers.models.perceiver.modeling_perceiver import (
    PerceiverBasicDecoder,
    PerceiverClassificationDecoder,
)
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
FIXTURES_DIR = HERE / "fixtures"
SIDECAR = "perceiver_edge_decoder.json"

# Multimodal graph output names. They cannot be "audio" / "image" / "label":
# "image" and "audio" are already graph *input* names, and ONNX value names
# must be unique (SSA) -- onnx.checker and onnxruntime reject such a graph.
MULTIMODAL_OUTPUTS = {"audio": "audio_logits", "image": "image_logits", "label": "label_logits"}
KEEP_FILES = {"config.json", "model.safetensors"}

ATOL = 1e-4
RTOL = 1e-5  # |err| <= ATOL + RTOL * |expected|

# Sanity thresholds for "the test is discriminative".
MIN_STD = 0.1
MIN_INPUT_SENSITIVITY = 0.25  # max |out(x1) - out(x2)| relative to std(out)
# float64-vs-float32 re-evaluation must stay well inside the tolerance,
# otherwise an exact-but-differently-rounded implementation could fail.
MAX_F64_DRIFT_FRACTION = 0.25

torch.set_num_threads(1)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    export_args: list[str]
    inputs: list[tuple[str, np.ndarray]]
    outputs: list[tuple[str, np.ndarray]]
    note: str = ""


@dataclass
class Fixture:
    name: str
    description: str
    model: nn.Module
    cases: list[Case] = field(default_factory=list)
    sidecar: dict | None = None
    # (primary output, output for a different input) for the sensitivity check
    sensitivity: tuple[np.ndarray, np.ndarray] | None = None
    # max |f64 - f32| over the cases, filled by the float64 re-evaluation
    f64_drift: float | None = None


# Set by f64_drift() while it re-runs a fixture builder in float64.
_FLOAT64 = False


def _real() -> type:
    return np.float64 if _FLOAT64 else np.float32


def np32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(_real()))


def np64i(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.int64))


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(_real()))


@torch.no_grad()
def perturb(
    model: nn.Module,
    overrides: dict[str, float] | None = None,
    emphasize: dict[str, tuple[int, float]] | None = None,
) -> None:
    """Replace transformers' near-zero init by weights of O(1) effect.

    * LayerNorm / BatchNorm weight = 1 + N(0, 0.2), bias = N(0, 0.2)
    * BatchNorm running_mean = N(0, 0.1), running_var = U(0.5, 1.5)
    * nn.Embedding tables (token + position) = N(0, 0.5)
    * latents = N(0, 1); trainable position encodings and the multimodal
      padding / mask parameters = N(0, 0.5)
    * other biases = N(0, 0.2)
    * matrices / conv kernels += N(0, 1/sqrt(fan_in)) (variance-preserving, so
      wide layers (fan_in up to ~1000) do not saturate softmax / GELU)
    * overrides: {parameter-name-substring: std multiplier} for weights that
      need a larger scale (e.g. flow's final layer, divided by 100 later).
    * emphasize: {parameter name: (n, factor)} multiplies the first n input
      columns of a matrix, e.g. the pixel channels of the encoder's key/value
      projections when they are 3 of 261 input channels (the rest being
      input-independent Fourier features), so outputs depend on the data.
    """
    overrides = overrides or {}
    done: set[str] = set()
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(1 + torch.randn_like(mod.weight) * 0.2)
            mod.bias.copy_(torch.randn_like(mod.bias) * 0.2)
            done |= {prefix + "weight", prefix + "bias"}
        elif isinstance(mod, nn.BatchNorm2d):
            mod.weight.copy_(1 + torch.randn_like(mod.weight) * 0.2)
            mod.bias.copy_(torch.randn_like(mod.bias) * 0.2)
            mod.running_mean.copy_(torch.randn_like(mod.running_mean) * 0.1)
            mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.5)
            done |= {prefix + "weight", prefix + "bias"}
        elif isinstance(mod, nn.Embedding):
            mod.weight.copy_(torch.randn_like(mod.weight) * 0.5)
            done.add(prefix + "weight")
        elif isinstance(mod, nn.ParameterDict):
            for k, p in mod.items():
                p.copy_(torch.randn_like(p) * 0.5)
                done.add(prefix + k)
    for name, p in model.named_parameters():
        if name in done:
            continue
        scale = 1.0
        for key, mult in overrides.items():
            if key in name:
                scale = mult
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "latents":
            p.copy_(torch.randn_like(p) * 1.0)
        elif leaf == "position_embeddings":
            p.copy_(torch.randn_like(p) * 0.5)
        elif leaf == "bias":
            p.copy_(torch.randn_like(p) * 0.2 * scale)
        elif p.ndim >= 2:
            fan_in = p[0].numel()
            p.add_(torch.randn_like(p) * (scale / math.sqrt(fan_in)))
        else:
            p.add_(torch.randn_like(p) * 0.2 * scale)
    params = dict(model.named_parameters())
    for name, (n, factor) in (emphasize or {}).items():
        params[name][:, :n] *= factor
    if _FLOAT64:
        # Only now: torch draws different random numbers for float64 params.
        model.double()
        torch.set_default_dtype(torch.float64)
    for name, b in model.named_buffers():
        if b.is_floating_point() and not any(
            name.endswith(s) for s in ("running_mean", "running_var")
        ):
            raise RuntimeError(f"unexpected float buffer {name}; extend perturb()")


def seed(s: int) -> np.random.RandomState:
    torch.manual_seed(s)
    return np.random.RandomState(s)


def randn(rng: np.random.RandomState, *shape) -> np.ndarray:
    # drawn as float32 in both modes, so the float64 re-run sees equal inputs
    return f32(rng.standard_normal(shape).astype(np.float32))


def run(model, **kw):
    with torch.no_grad():
        return model(**kw)


def tt(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a))


# ----------------------------------------------------------------------------
# decoder sidecar (bare PerceiverModel)
# ----------------------------------------------------------------------------


def decoder_from_sidecar(config: PerceiverConfig, sc: dict) -> nn.Module:
    """Build the transformers decoder module that a sidecar describes.

    Used both to create the fixtures and to reload them, which proves that the
    sidecar (+ config.json) is enough to rebuild the checkpoint exactly.
    """
    dims = list(sc["output_index_dims"])
    kwargs = dict(
        num_channels=sc["num_channels"],
        qk_channels=sc["qk_channels"],
        v_channels=sc["v_channels"],
        num_heads=sc["num_heads"],
        widening_factor=sc["widening_factor"],
        use_query_residual=sc["use_query_residual"],
        final_project=sc["final_project"],
    )
    if sc.get("project_pos_dim", -1) > 0:
        raise NotImplementedError("project_pos_dim > 0 is not used by the fixtures")
    if sc["position_encoding"] == "trainable":
        kwargs["position_encoding_type"] = "trainable"
        kwargs["trainable_position_encoding_kwargs"] = dict(
            num_channels=sc["num_channels"], index_dims=int(np.prod(dims))
        )
    elif sc["position_encoding"] == "fourier":
        f = sc["fourier"]
        kwargs["position_encoding_type"] = "fourier"
        kwargs["fourier_position_encoding_kwargs"] = dict(
            num_bands=f["num_bands"],
            max_resolution=list(f["max_resolution"]),
            concat_pos=f["concat_pos"],
            sine_only=f["sine_only"],
        )
    else:
        raise ValueError(sc["position_encoding"])

    if sc["type"] == "basic":
        index_dims = dims[0] if (len(dims) == 1 and sc["position_encoding"] == "trainable") else dims
        return PerceiverBasicDecoder(
            config, output_num_channels=sc["output_num_channels"], output_index_dims=index_dims, **kwargs
        )
    if sc["type"] == "classification":
        if sc["output_num_channels"] != config.num_labels or dims != [1]:
            raise ValueError("classification decoder: output_num_channels must be num_labels, dims [1]")
        return PerceiverClassificationDecoder(config, **kwargs)
    raise ValueError(sc["type"])


# ----------------------------------------------------------------------------
# transformers paths that PerceiverModel.forward cannot take (see README)
# ----------------------------------------------------------------------------


def latents_of(perceiver: PerceiverModel, **kw) -> torch.Tensor:
    """Encoder output z, via PerceiverModel.forward with the decoder detached."""
    dec = perceiver.decoder
    perceiver.decoder = None
    try:
        return run(perceiver, **kw).last_hidden_state
    finally:
        perceiver.decoder = dec


def basic_full_query(decoder: PerceiverBasicDecoder, batch: int) -> torch.Tensor:
    """transformers' non-subsampled decoder_query over the decoder's own
    output_index_dims (linspace(-1, 1) grid).

    PerceiverBasicDecoder.decoder_query takes index_dims = inputs.shape[2:]
    (the original DeepMind code uses output_index_dims); with the usual
    [B, N, C] inputs that is (C,) and the Fourier query has the wrong width.
    Feeding a dummy [B, 1, *output_index_dims] tensor makes transformers' own
    branch build the grid the decoder was configured for.
    """
    dims = decoder.output_index_dims
    dims = [dims] if isinstance(dims, int) else list(dims)
    dummy = torch.zeros([batch, 1] + dims)
    with torch.no_grad():
        return decoder.decoder_query(dummy)


# ----------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------


def fx_image_fourier() -> Fixture:
    rng = seed(1001)
    cfg = PerceiverConfig(
        d_latents=32, num_latents=8, qk_channels=16, v_channels=32,
        num_cross_attention_heads=1, num_self_attention_heads=4,
        num_blocks=2, num_self_attends_per_block=2, num_labels=5, image_size=16,
    )
    model = PerceiverForImageClassificationFourier(cfg).eval()
    xattn = "perceiver.encoder.cross_attention.attention.self."
    perturb(model, emphasize={xattn + "key.weight": (3, 8.0), xattn + "value.weight": (3, 8.0)})
    x1 = randn(rng, 1, 3, 12, 16)
    x2 = randn(rng, 2, 3, 12, 16)
    y1 = np32(run(model, pixel_values=tt(x1)).logits)
    y2 = np32(run(model, pixel_values=tt(x2)).logits)
    fx = Fixture(
        "image_fourier",
        "PerceiverForImageClassificationFourier, pixels + 2D Fourier features "
        "(max_resolution 224x224), non-square 12x16 input, qk 16 / v 32, "
        "1 cross head, 4 self heads, 2 blocks x 2 self-attends, 5 labels.",
        model,
    )
    fx.cases = [
        Case("b1", ["--image-size", "12", "16"], [("pixel_values", x1)], [("logits", y1)]),
        Case("b2", ["--image-size", "12", "16", "--batch", "2"], [("pixel_values", x2)], [("logits", y2)]),
    ]
    fx.sensitivity = (y2[0], y2[1])
    return fx


def fx_image_learned() -> Fixture:
    rng = seed(1002)
    cfg = PerceiverConfig(
        image_size=8, d_latents=32, num_latents=8, num_blocks=1, num_self_attends_per_block=2,
        self_attention_widening_factor=2, cross_attention_widening_factor=4,
        use_query_residual=False, num_self_attention_heads=2, num_cross_attention_heads=2,
        qk_channels=32, v_channels=32, num_labels=4,
    )
    model = PerceiverForImageClassificationLearned(cfg).eval()
    xattn = "perceiver.encoder.cross_attention.attention.self."
    perturb(model, emphasize={xattn + "key.weight": (256, 3.0), xattn + "value.weight": (256, 2.0)})
    x1 = randn(rng, 1, 3, 8, 8)
    x2 = randn(rng, 1, 3, 8, 8)
    y1 = np32(run(model, pixel_values=tt(x1)).logits)
    y2 = np32(run(model, pixel_values=tt(x2)).logits)
    # Another resolution: the trained 8x8 positions resized bicubically (interpolate_pos_encoding).
    x3 = randn(rng, 1, 3, 6, 10)
    y3 = np32(run(model, pixel_values=tt(x3), interpolate_pos_encoding=True).logits)
    fx = Fixture(
        "image_learned",
        "PerceiverForImageClassificationLearned, conv1x1 (256 ch) + trainable "
        "position embeddings (64x256, projected 256->256), 8x8 input, widening "
        "self 2 / cross 4, use_query_residual False, qk/v 32, 4 labels.",
        model,
    )
    fx.cases = [
        Case("default", ["--image-size", "8", "8"], [("pixel_values", x1)], [("logits", y1)]),
        Case("interp", ["--image-size", "6", "10"], [("pixel_values", x3)], [("logits", y3)]),
    ]
    fx.sensitivity = (y1, y2)
    return fx


def fx_image_conv() -> Fixture:
    rng = seed(1003)
    cfg = PerceiverConfig(
        d_latents=48, num_latents=8, num_self_attention_heads=3, num_cross_attention_heads=3,
        cross_attention_shape_for_attention="q", num_blocks=1, num_self_attends_per_block=2,
        num_labels=6, image_size=32,
    )
    model = PerceiverForImageClassificationConvProcessing(cfg).eval()
    xattn = "perceiver.encoder.cross_attention.attention.self."
    perturb(model, emphasize={xattn + "key.weight": (64, 3.0), xattn + "value.weight": (64, 2.0)})
    x1 = randn(rng, 1, 3, 32, 40)
    x2 = randn(rng, 1, 3, 32, 40)
    y1 = np32(run(model, pixel_values=tt(x1)).logits)
    y2 = np32(run(model, pixel_values=tt(x2)).logits)
    fx = Fixture(
        "image_conv",
        "PerceiverForImageClassificationConvProcessing: conv7x7/2 (same pad) + "
        "BatchNorm (eval stats) + ReLU + maxpool3/2 -> 7x9 grid, 2D Fourier "
        "(max_resolution 56x56), non-square 32x40 input, "
        "cross_attention_shape_for_attention 'q', d_latents 48, 3 self + 3 cross "
        "heads, 6 labels.",
        model,
    )
    fx.cases = [Case("default", ["--image-size", "32", "40"], [("pixel_values", x1)], [("logits", y1)])]
    fx.sensitivity = (y1, y2)
    return fx


def fx_mlm() -> Fixture:
    rng = seed(1004)
    cfg = PerceiverConfig(
        d_model=32, max_position_embeddings=24, d_latents=32, num_latents=12,
        num_self_attention_heads=4, num_cross_attention_heads=2, num_blocks=1,
        num_self_attends_per_block=2, vocab_size=262,
    )
    model = PerceiverForMaskedLM(cfg).eval()
    perturb(model)
    V, S = cfg.vocab_size, cfg.max_position_embeddings

    ids = np64i(rng.randint(0, V, size=(1, S)))
    y_full = np32(run(model, input_ids=tt(ids)).logits)  # [1, 24, V]

    # --seq-len 20 --attention-mask: 15 real tokens + 5 padding positions
    # (padding ids are random on purpose: they must be masked out).
    ids20 = np64i(rng.randint(0, V, size=(1, 20)))
    mask20 = np64i([[1] * 15 + [0] * 5])
    y_mask = np32(run(model, input_ids=tt(ids20), attention_mask=tt(mask20)).logits)  # [1, 24, V]
    y_nomask = np32(run(model, input_ids=tt(ids20)).logits)
    assert np.abs(y_mask - y_nomask).max() > 0.1, "attention mask has no effect"

    # --decode-subset 5: decoding is per query, so gather the full output.
    idx = np64i(rng.choice(S, size=5, replace=False))
    y_sub = f32(y_full[:, idx, :])

    ids_b = np64i(rng.randint(0, V, size=(1, S)))
    y_b = np32(run(model, input_ids=tt(ids_b)).logits)

    fx = Fixture(
        "mlm",
        "PerceiverForMaskedLM, vocab 262, d_model 32, max_position_embeddings 24, "
        "d_latents 32, 12 latents; decoder: 24 trainable queries, 8 heads, qk 256, "
        "then logits = h @ embeddings^T + bias.",
        model,
    )
    fx.cases = [
        Case("default", [], [("input_ids", ids)], [("logits", y_full)]),
        Case(
            "mask",
            ["--seq-len", "20", "--attention-mask"],
            [("input_ids", ids20), ("attention_mask", mask20)],
            [("logits", y_mask)],
            note="seq 20 < max_position_embeddings; output still has 24 positions",
        ),
        Case(
            "subset",
            ["--decode-subset", "5"],
            [("input_ids", ids), ("output_indices", idx)],
            [("logits", y_sub)],
        ),
    ]
    fx.sensitivity = (y_full, y_b)
    return fx


def fx_seqcls() -> Fixture:
    rng = seed(1005)
    cfg = PerceiverConfig(
        d_model=24, max_position_embeddings=16, d_latents=40, num_latents=10,
        num_self_attention_heads=5, num_cross_attention_heads=4,
        self_attention_widening_factor=4, cross_attention_widening_factor=4,
        num_blocks=1, num_self_attends_per_block=2, num_labels=3, vocab_size=262,
    )
    model = PerceiverForSequenceClassification(cfg).eval()
    perturb(model)
    V, S = cfg.vocab_size, cfg.max_position_embeddings
    ids = np64i(rng.randint(0, V, size=(1, S)))
    y = np32(run(model, input_ids=tt(ids)).logits)
    ids_m = np64i(rng.randint(0, V, size=(1, S)))
    mask = np64i([[1] * 11 + [0] * 5])
    y_m = np32(run(model, input_ids=tt(ids_m), attention_mask=tt(mask)).logits)
    y_nomask = np32(run(model, input_ids=tt(ids_m)).logits)
    assert np.abs(y_m - y_nomask).max() > 0.1, "attention mask has no effect"
    fx = Fixture(
        "seqcls",
        "PerceiverForSequenceClassification, d_model 24, max_position_embeddings 16, "
        "d_latents 40, 5 self heads, 4 cross heads, widening 4 (self and cross), "
        "3 labels.",
        model,
    )
    fx.cases = [
        Case("default", [], [("input_ids", ids)], [("logits", y)]),
        Case("mask", ["--attention-mask"], [("input_ids", ids_m), ("attention_mask", mask)], [("logits", y_m)],
             note="11 real tokens + 5 padding positions (random ids)"),
    ]
    fx.sensitivity = (y, y_nomask)
    return fx


def fx_flow() -> Fixture:
    rng = seed(1006)
    cfg = PerceiverConfig(
        train_size=[8, 12], d_latents=32, num_latents=8, num_self_attention_heads=4,
        num_cross_attention_heads=1, qk_channels=32, v_channels=32,
        num_blocks=1, num_self_attends_per_block=2,
    )
    model = PerceiverForOpticalFlow(cfg).eval()
    # The decoder output is divided by rescale_factor=100; scale its final
    # projection up so the flow values have O(0.3) spread.
    perturb(model, overrides={"decoder.decoder.final_layer": 50.0})
    H, W = cfg.train_size
    x1 = randn(rng, 1, 2, 27, H, W)
    x2 = randn(rng, 1, 2, 27, H, W)
    y1 = np32(run(model, inputs=tt(x1)).logits)  # [1, H, W, 2]
    y2 = np32(run(model, inputs=tt(x2)).logits)
    idx = np64i(rng.choice(H * W, size=7, replace=False))
    y_sub = f32(y1.reshape(1, H * W, 2)[:, idx, :])
    fx = Fixture(
        "flow",
        "PerceiverForOpticalFlow, train_size [8, 12]: 2 frames x 27 patch "
        "channels -> Linear(54, 64) + 2D Fourier (64 bands), decoder queries = "
        "preprocessed inputs, output / 100.",
        model,
    )
    fx.cases = [
        Case("full", [], [("inputs", x1)], [("logits", y1)]),
        Case("subset", ["--decode-subset", "7"], [("inputs", x1), ("output_indices", idx)], [("logits", y_sub)],
             note="indices into the flattened H*W positions"),
    ]
    fx.sensitivity = (y1, y2)
    return fx


def fx_multimodal() -> Fixture:
    rng = seed(1007)
    cfg = PerceiverConfig(
        num_frames=2, image_size=8, audio_samples_per_frame=16, samples_per_patch=16,
        output_shape=[1, 2, 8, 8], output_num_channels=16, num_labels=4,
        d_latents=32, num_latents=8, num_self_attention_heads=2, num_cross_attention_heads=1,
        qk_channels=32, v_channels=32, num_blocks=1, num_self_attends_per_block=1,
        # default 1024 makes the shared decoder 1026 channels wide (two
        # 1026x1026 MLP matrices = 8.4 MB); 40 keeps the fixture small.
        _label_trainable_num_channels=40,
    )
    model = PerceiverForMultimodalAutoencoding(cfg).eval()
    perturb(model)
    T, S = cfg.num_frames, cfg.image_size
    n_audio = cfg.num_frames * cfg.audio_samples_per_frame
    n_img_points = T * S * S
    n_audio_points = n_audio // cfg.samples_per_patch

    def inputs(img, aud):
        # The label modality is masked with probability 1.0 by transformers,
        # so its value never matters (any finite tensor).
        return dict(image=tt(img), audio=tt(aud), label=torch.zeros(img.shape[0], cfg.num_labels))

    img1 = randn(rng, 1, T, 3, S, S)
    aud1 = randn(rng, 1, n_audio, 1)
    img2 = randn(rng, 1, T, 3, S, S)
    aud2 = randn(rng, 1, n_audio, 1)

    pm = model.perceiver

    def full_decode(img, aud):
        # PerceiverForMultimodalAutoencoding(inputs) without
        # subsampled_output_points crashes in transformers (see README), so the
        # full decode is assembled from transformers' modules:
        #   z       = PerceiverModel.forward (decoder detached)
        #   queries = each modality decoder's non-subsampled decoder_query over
        #             its output_index_dims (linspace grid), then the multimodal
        #             decoder's own padding/concat (decoder_query with the
        #             modality decoders' queries substituted)
        #   logits  = shared decoder + multimodal postprocessor.
        inp = inputs(img, aud)
        z = latents_of(pm, inputs=inp)
        mdec = pm.decoder
        for dec in mdec.modalities.values():
            inner = getattr(dec, "decoder", dec)
            q = basic_full_query(inner, img.shape[0])
            dec.decoder_query = (lambda q: (lambda *a, **k: q))(q)
        try:
            with torch.no_grad():
                prep, sizes, _ = pm.input_preprocessor(inp)
                query = mdec.decoder_query(prep, sizes, None, subsampled_points=None)
                out = mdec(query, z).logits
                res = pm.output_postprocessor(
                    out, modality_sizes={"audio": n_audio_points, "image": n_img_points, "label": 1}
                )
        finally:
            for dec in mdec.modalities.values():
                dec.__dict__.pop("decoder_query", None)
        return res

    full = full_decode(img1, aud1)
    full2 = full_decode(img2, aud2)

    # chunked decode exactly as in transformers' docs: subsampled_output_points
    img_pts = np64i(rng.choice(n_img_points, size=24, replace=False))
    aud_pts = np64i([1, 0])
    chunk = run(
        model,
        inputs=inputs(img1, aud1),
        subsampled_output_points={"image": tt(img_pts), "audio": tt(aud_pts), "label": None},
    ).logits
    # label is decoded from a trainable query either way: identical
    assert torch.allclose(chunk["label"], full["label"], atol=1e-5)
    # Point 0 sits at -1 on both grids (linspace and -1 + 2*i/d), so it must
    # decode identically via the subsampled path: cross-checks the assembled
    # full decode (query padding, modality order, postprocessor slicing).
    probe = run(
        model,
        inputs=inputs(img1, aud1),
        subsampled_output_points={"image": tt(np64i([0])), "audio": tt(np64i([0])), "label": None},
    ).logits
    assert torch.allclose(probe["image"][:, 0], full["image"][:, 0], atol=1e-5)
    assert torch.allclose(probe["audio"], full["audio"][:, : cfg.samples_per_patch], atol=1e-5)
    assert torch.allclose(chunk["audio"][:, cfg.samples_per_patch :], probe["audio"], atol=1e-5)

    fx = Fixture(
        "multimodal",
        "PerceiverForMultimodalAutoencoding, 2 frames of 8x8 RGB (space-to-depth 4 "
        "-> 2x2x2 patches, 3D Fourier 32 bands), 32 audio samples (patches of 16, "
        "1D Fourier 192 bands), 4 labels (label input masked with p=1), "
        "_label_trainable_num_channels 40, output_num_channels 16.",
        model,
    )
    fx.cases = [
        Case(
            "full",
            [],
            [("image", img1), ("audio", aud1)],
            [(MULTIMODAL_OUTPUTS[k], np32(full[k])) for k in ("audio", "image", "label")],
            note="Fourier queries on the linspace(-1,1) grid over output_index_dims "
            "(transformers' non-subsampled branch; its forward() crashes here)",
        ),
        Case(
            "chunk",
            ["--image-points", str(len(img_pts)), "--audio-points", str(len(aud_pts))],
            [("image", img1), ("audio", aud1), ("image_points", img_pts), ("audio_points", aud_pts)],
            [(MULTIMODAL_OUTPUTS[k], np32(chunk[k])) for k in ("audio", "image", "label")],
            note="transformers subsampled_output_points: Fourier positions -1 + 2*idx/dims",
        ),
    ]
    fx.sensitivity = (np32(full["image"]), np32(full2["image"]))
    return fx


def bare_fixture(name, description, cfg, sidecar, rng, build_cases) -> Fixture:
    decoder = decoder_from_sidecar(cfg, sidecar) if sidecar else None
    model = PerceiverModel(cfg, decoder=decoder).eval()
    perturb(model)
    fx = Fixture(name, description, model, sidecar=sidecar)
    build_cases(fx, model, rng)
    return fx


def fx_bare_trainable() -> Fixture:
    rng = seed(1008)
    cfg = PerceiverConfig(
        d_model=6, d_latents=24, num_latents=8, num_self_attention_heads=3,
        num_cross_attention_heads=3, num_blocks=2, num_self_attends_per_block=1,
    )
    M = 50
    sidecar = {
        "type": "basic", "position_encoding": "trainable", "output_index_dims": [10],
        "num_channels": 16, "output_num_channels": 4, "num_heads": 2,
        "qk_channels": 8, "v_channels": None, "widening_factor": 2,
        "use_query_residual": True, "final_project": True, "project_pos_dim": -1,
    }

    def cases(fx, model, rng):
        x = randn(rng, 1, M, 6)
        y = np32(run(model, inputs=tt(x)).logits)  # [1, 10, 4]
        idx = np64i(rng.choice(10, size=4, replace=False))
        # transformers ignores subsampled_points for trainable queries (it
        # always decodes all of them), so the subset is a gather.
        y_sub = f32(y[:, idx, :])
        xm = randn(rng, 1, M, 6)
        mask = np.ones((1, M), dtype=np.int64)
        mask[0, 10:14] = 0
        mask[0, 37:] = 0
        ym = np32(run(model, inputs=tt(xm), attention_mask=tt(mask)).logits)
        ym_nomask = np32(run(model, inputs=tt(xm)).logits)
        assert np.abs(ym - ym_nomask).max() > 0.1, "attention mask has no effect"
        sl = ["--seq-len", str(M)]
        fx.cases = [
            Case("full", sl, [("inputs", x)], [("logits", y)]),
            Case("subset", sl + ["--decode-subset", "4"],
                 [("inputs", x), ("output_indices", idx)], [("logits", y_sub)]),
            Case("mask", sl + ["--attention-mask"], [("inputs", xm), ("attention_mask", mask)], [("logits", ym)],
                 note="mask zeros at 10..13 and 37..49 (not only trailing)"),
        ]
        fx.sensitivity = (y, np32(run(model, inputs=tt(xm)).logits))

    return bare_fixture(
        "bare_trainable",
        "bare PerceiverModel (no preprocessor), d_model 6, M 50, d_latents 24, with a "
        "PerceiverBasicDecoder (sidecar): 10 trainable queries of width 16, 2 heads, "
        "qk 8, widening 2, query residual, final projection to 4 channels.",
        cfg, sidecar, rng, cases,
    )


def fx_bare_fourier() -> Fixture:
    rng = seed(1009)
    cfg = PerceiverConfig(
        d_model=8, d_latents=32, num_latents=8, num_self_attention_heads=4,
        num_cross_attention_heads=2, num_blocks=1, num_self_attends_per_block=2,
    )
    M = 30
    fourier = {"num_bands": 6, "max_resolution": [4, 5], "concat_pos": True, "sine_only": False}
    width = 2 + 2 * 2 * 6
    sidecar = {
        "type": "basic", "position_encoding": "fourier", "output_index_dims": [4, 5],
        "num_channels": width, "output_num_channels": 3, "num_heads": 2,
        "qk_channels": None, "v_channels": None, "widening_factor": 1,
        "use_query_residual": False, "final_project": True,
        "fourier": fourier, "project_pos_dim": -1,
    }

    def cases(fx, model, rng):
        dec = model.decoder
        assert dec.output_position_encodings.output_size() == width

        def full(x):
            z = latents_of(model, inputs=tt(x))
            with torch.no_grad():
                return np32(dec(basic_full_query(dec, x.shape[0]), z).logits)

        x = randn(rng, 1, M, 8)
        y = full(x)  # [1, 20, 3]
        idx = np64i(rng.choice(20, size=6, replace=False))
        z = latents_of(model, inputs=tt(x))
        with torch.no_grad():
            q = dec.decoder_query(tt(x), subsampled_points=tt(idx))
            y_sub = np32(dec(q, z).logits)  # [1, 6, 3]
        # The subsampled grid (-1 + 2*i/d) is not the full grid (linspace) ...
        assert np.abs(y_sub - y[:, idx, :]).max() > 1e-2
        # ... except at point 0 (-1 on both), which cross-checks the full path.
        with torch.no_grad():
            y0 = np32(dec(dec.decoder_query(tt(x), subsampled_points=tt(np64i([0]))), z).logits)
        assert np.abs(y0[:, 0] - y[:, 0]).max() < 1e-5
        sl = ["--seq-len", str(M)]
        fx.cases = [
            Case("full", sl, [("inputs", x)], [("logits", y)],
                 note="queries on the linspace(-1,1) grid over output_index_dims [4,5]"),
            Case("subset", sl + ["--decode-subset", "6"], [("inputs", x), ("output_indices", idx)],
                 [("logits", y_sub)],
                 note="transformers' subsampled path: positions -1 + 2*unravel(idx)/dims, "
                 "NOT a gather of the full output"),
        ]
        fx.sensitivity = (y, full(randn(rng, 1, M, 8)))

    return bare_fixture(
        "bare_fourier",
        "bare PerceiverModel, d_model 8, M 30, d_latents 32, with a PerceiverBasicDecoder "
        "(sidecar) whose queries are 2D Fourier features over output_index_dims [4, 5] "
        "(6 bands, max_resolution [4, 5], width 26), output 3 channels.",
        cfg, sidecar, rng, cases,
    )


def fx_bare_latents() -> Fixture:
    rng = seed(1010)
    cfg = PerceiverConfig(
        d_model=5, d_latents=24, num_latents=12, num_self_attention_heads=2,
        num_cross_attention_heads=1, num_blocks=1, num_self_attends_per_block=2,
        self_attention_widening_factor=2,
    )
    M = 17

    def cases(fx, model, rng):
        x = randn(rng, 1, M, 5)
        y = np32(run(model, inputs=tt(x)).last_hidden_state)  # [1, 12, 24]
        fx.cases = [Case("default", ["--seq-len", str(M)], [("inputs", x)], [("last_hidden_state", y)])]
        fx.sensitivity = (y, np32(run(model, inputs=tt(randn(rng, 1, M, 5))).last_hidden_state))

    return bare_fixture(
        "bare_latents",
        "bare PerceiverModel without decoder: d_model 5, M 17, 12 latents of 24; "
        "output last_hidden_state.",
        cfg, None, rng, cases,
    )


BUILDERS = [
    fx_image_fourier,
    fx_image_learned,
    fx_image_conv,
    fx_mlm,
    fx_seqcls,
    fx_flow,
    fx_multimodal,
    fx_bare_trainable,
    fx_bare_fourier,
    fx_bare_latents,
]


# ----------------------------------------------------------------------------
# writing + verification
# ----------------------------------------------------------------------------


def reload_model(fx: Fixture, d: Path) -> nn.Module:
    """Rebuild the model from the written files and check it is identical."""
    config = PerceiverConfig.from_pretrained(d)
    (arch,) = config.architectures
    if arch == "PerceiverModel":
        sc_path = d / SIDECAR
        sc = json.loads(sc_path.read_text()) if sc_path.exists() else None
        model = PerceiverModel(config, decoder=decoder_from_sidecar(config, sc) if sc else None)
        model.load_state_dict(load_file(d / "model.safetensors"), strict=True)
    else:
        cls = getattr(transformers, arch)
        model, info = cls.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise RuntimeError(f"{fx.name}: loading info {bad}")
    model.eval()
    ref = fx.model.state_dict()
    got = model.state_dict()
    if set(ref) != set(got):
        raise RuntimeError(f"{fx.name}: state dict keys differ: {set(ref) ^ set(got)}")
    for k in ref:
        if not torch.equal(ref[k], got[k]):
            raise RuntimeError(f"{fx.name}: {k} differs after reload")
    return model


def check_discriminative(fx: Fixture) -> tuple[dict, list[str]]:
    errs = []
    stds = []
    for case in fx.cases:
        for name, arr in case.outputs:
            std = float(arr.std())
            stds.append(std)
            if std < MIN_STD:
                errs.append(f"{fx.name}/{case.name}/{name}: std {std:.3g} < {MIN_STD}")
            if not np.isfinite(arr).all():
                errs.append(f"{fx.name}/{case.name}/{name}: non-finite values")
    a, b = fx.sensitivity
    sens = float(np.abs(a - b).max() / max(a.std(), 1e-12))
    if sens < MIN_INPUT_SENSITIVITY:
        errs.append(f"{fx.name}: output barely depends on the input ({sens:.3g})")
    return {"min_std": min(stds), "sensitivity": sens}, errs


def f64_drift(fx: Fixture, builder) -> float:
    """Re-run the fixture builder in float64 and return max |f32 - f64| / tol.

    A fixture whose float32 result drifts a sizeable fraction of the tolerance
    away from the float64 result is ill-conditioned: a correct implementation
    that rounds differently (e.g. Fourier features computed in float64 at
    export time) might fail it.  Same seeds, same weights (converted to
    float64 after they are drawn), same inputs.
    """
    global _FLOAT64
    old_dtype = torch.get_default_dtype()
    _FLOAT64 = True
    try:
        fx64 = builder()
    finally:
        _FLOAT64 = False
        torch.set_default_dtype(old_dtype)
    worst = 0.0
    for c32, c64 in zip(fx.cases, fx64.cases, strict=True):
        for (n32, a32), (n64, a64) in zip(c32.outputs, c64.outputs, strict=True):
            assert n32 == n64 and a32.shape == a64.shape and a64.dtype == np.float64, (fx.name, c32.name, n32)
            tol = ATOL + RTOL * np.abs(a64)
            worst = max(worst, float((np.abs(a32.astype(np.float64) - a64) / tol).max()))
    return worst


def write_fixture(fx: Fixture) -> Path:
    d = FIXTURES_DIR / fx.name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    fx.model.save_pretrained(d, safe_serialization=True)
    for p in d.iterdir():
        if p.name not in KEEP_FILES:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    if fx.sidecar is not None:
        (d / SIDECAR).write_text(json.dumps(fx.sidecar, indent=2) + "\n")

    cases_json = []
    for case in fx.cases:
        def entries(items, kind):
            out = []
            for name, arr in items:
                arr = np.ascontiguousarray(arr)
                assert arr.dtype in (np.float32, np.int64), (fx.name, case.name, name, arr.dtype)
                fname = f"{case.name}.{kind}.{name}.npy"
                assert not (d / fname).exists(), fname
                np.save(d / fname, arr)
                out.append({"name": name, "file": fname, "dtype": str(arr.dtype), "shape": list(arr.shape)})
            return out

        cj = {
            "name": case.name,
            "export_args": case.export_args,
            "inputs": entries(case.inputs, "in"),
            "outputs": entries(case.outputs, "out"),
            "atol": ATOL,
            "rtol": RTOL,
        }
        if case.note:
            cj["note"] = case.note
        cases_json.append(cj)
    meta = {
        "description": fx.description,
        "architecture": json.loads((d / "config.json").read_text())["architectures"][0],
        "atol": ATOL,
        "rtol": RTOL,
        "cases": cases_json,
    }
    (d / "fixture.json").write_text(json.dumps(meta, indent=2) + "\n")
    return d


def main() -> int:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    names = {b.__name__[3:] for b in BUILDERS}
    for stale in FIXTURES_DIR.iterdir():
        if stale.is_dir() and stale.name not in names:
            shutil.rmtree(stale)

    rows = []
    errors = []
    for builder in BUILDERS:
        fx = builder()
        d = write_fixture(fx)
        reload_model(fx, d)
        stats, errs = check_discriminative(fx)
        drift = f64_drift(fx, builder)
        if drift > MAX_F64_DRIFT_FRACTION:
            errs.append(f"{fx.name}: float32 result drifts {drift:.2f} x tol from float64")
        errors += errs
        size = sum(p.stat().st_size for p in d.iterdir())
        n_params = sum(p.numel() for p in fx.model.parameters())
        rows.append((fx.name, ",".join(c.name for c in fx.cases), n_params, size, stats, drift))

    total = sum(r[3] for r in rows)
    print()
    hdr = f"{'fixture':<16}{'cases':<22}{'params':>9}{'bytes':>10}{'min std':>9}{'sens':>7}{'f64 drift/tol':>15}"
    print(hdr)
    print("-" * len(hdr))
    for name, cases, n_params, size, stats, drift in rows:
        print(f"{name:<16}{cases:<22}{n_params:>9}{size:>10}{stats['min_std']:>9.3f}"
              f"{stats['sensitivity']:>7.2f}{drift:>15.4f}")
    print("-" * len(hdr))
    print(f"{'total':<16}{'':<22}{'':>9}{total:>10}  ({total / 2**20:.2f} MiB)")
    for e in errors:
        print("ERROR:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
