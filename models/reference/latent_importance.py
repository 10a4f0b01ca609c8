"""Independent reference for perceiver-edge's latent importance (`--latents K`).

Runs transformers' PerceiverForImageClassificationFourier on the digits calibration samples with
output_attentions=True and computes, per latent j, the attention mass it receives:
  self-attention layers: sum_{b,h} sum_{i != j} P[b,h,i,j] / (B H N)
  decoder cross-attention: sum_{b,h,o} P[b,h,o,j] / (B H O)
summed over layers and averaged over samples (see engine/export/src/budget.rs). Writes
fixtures/digits_latent_importance.json for engine/export/tests/budget.rs. Needs torch.

    /work/refvenv/bin/python models/reference/latent_importance.py
"""
import json
import pathlib

import numpy as np
import torch
from transformers import PerceiverForImageClassificationFourier

root = pathlib.Path(__file__).resolve().parents[2]
model = PerceiverForImageClassificationFourier.from_pretrained(root / "models/digits").eval()
x = np.load(root / "models/digits/samples/heldout_inputs.npy")[0::2]  # the even samples tune uses
n = model.config.num_latents
total = np.zeros(n)
with torch.no_grad():
    for s in range(len(x)):
        out = model(pixel_values=torch.from_numpy(x[s : s + 1]), output_attentions=True)
        for p in out.attentions:  # latent self-attention, [B, H, N, N]
            p = p.double().numpy()
            mass = p.sum(axis=(0, 1, 2)) - np.einsum("bhii->i", p)
            total += mass / (p.shape[0] * p.shape[1] * p.shape[2])
        p = out.cross_attentions[-1].double().numpy()  # decoder cross-attention, [B, H, O, N]
        assert p.shape[-1] == n
        total += p.sum(axis=(0, 1, 2)) / (p.shape[0] * p.shape[1] * p.shape[2])
imp = total / len(x)
order = sorted(range(n), key=lambda j: (-imp[j], j))
out = {"samples": "models/digits/samples/heldout_inputs.npy[0::2]", "count": len(x),
       "importance": imp.tolist(), "order": order}
path = root / "models/reference/fixtures/digits_latent_importance.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print("order", order)
print("importance", np.round(imp, 5).tolist())
