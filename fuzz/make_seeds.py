#!/usr/bin/env python3
"""Writes tiny checkpoints for the fuzz seed corpus (stdlib only, deterministic).

Each is a copy of a reference fixture (models/reference/fixtures/NAME) with every dimension
shrunk by a fixed map (tensor names and layout unchanged), so that an export takes well under a
millisecond and a seed stays a few KiB. Usage: make_seeds.py OUT_DIR; writes OUT_DIR/NAME/
{config.json, model.safetensors}. scripts/fuzz-seeds.sh turns them into the seed corpus.
"""
import json
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "models", "reference", "fixtures")

# fixture -> (config overrides, dim map old -> new, config keys kept)
TINY = {
    "bare_latents": (
        {"d_latents": 4, "d_model": 2, "num_latents": 2, "max_position_embeddings": 3, "num_self_attends_per_block": 1},
        {24: 4, 5: 2, 12: 2, 48: 8},
    ),
    "image_fourier": (
        {"d_latents": 4, "num_latents": 2, "qk_channels": 4, "v_channels": 4, "image_size": 2,
         "num_self_attends_per_block": 1, "num_blocks": 2,
         "id2label": {"0": "a", "1": "b", "2": "c"}, "label2id": {"a": 0, "b": 1, "c": 2}},
        {32: 4, 16: 4, 8: 2, 5: 3},
    ),
}

KEEP = ["architectures", "cross_attention_shape_for_attention", "cross_attention_widening_factor", "d_latents",
        "d_model", "hidden_act", "id2label", "image_size", "label2id", "layer_norm_eps", "max_position_embeddings",
        "model_type", "num_blocks", "num_cross_attention_heads", "num_latents", "num_self_attends_per_block",
        "num_self_attention_heads", "qk_channels", "self_attention_widening_factor", "train_size",
        "use_query_residual", "v_channels", "vocab_size"]


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def main(out):
    for name, (overrides, dims) in TINY.items():
        src = os.path.join(FIX, name)
        cfg = json.load(open(os.path.join(src, "config.json")))
        cfg = {k: v for k, v in cfg.items() if k in KEEP}
        cfg.update(overrides)
        layers = cfg["num_self_attends_per_block"]
        header = read_header(os.path.join(src, "model.safetensors"))
        tensors, data, seed = {}, bytearray(), 12345
        for key in sorted(k for k in header if k != "__metadata__"):
            # keep only the self-attention layers the config declares
            parts = key.split(".")
            if "self_attends" in parts and int(parts[parts.index("self_attends") + 1]) >= layers:
                continue
            shape = [dims.get(d, d) for d in header[key]["shape"]]
            n = 1
            for d in shape:
                n *= d
            vals = []
            for _ in range(n):
                seed = (seed * 1103515245 + 12345) % 2**31
                vals.append(1.0 if "layernorm" in key and key.endswith("weight") else (seed / 2**31 - 0.5) * 0.5)
            tensors[key] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + 4 * n]}
            data += struct.pack(f"<{n}f", *vals)
        hjson = json.dumps(tensors, separators=(",", ":")).encode()
        hjson += b" " * (-len(hjson) % 8)
        dst = os.path.join(out, name)
        os.makedirs(dst, exist_ok=True)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f, separators=(",", ":"), sort_keys=True)
        with open(os.path.join(dst, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(hjson)) + hjson + data)


if __name__ == "__main__":
    main(sys.argv[1])
