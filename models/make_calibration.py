#!/usr/bin/env python3
"""Write calibration data for `perceiver-edge distill` / `tune --recover` on the bundled models.

Recovery must never see the held-out samples the model cards measure on, so the calibration
sets come from the training side:

    python models/make_calibration.py digits OUT.npy [--labels L.npy]   # the 1347 training images
    python models/make_calibration.py marker OUT.npy [--frames N] [--labels T.npy]   # seed 7
    python models/make_calibration.py shapes OUT.npy [--frames N] [--labels L.npy]   # seed 1000007

digits: the training split of models/train_digits.py (scikit-learn's load_digits, the same
stratified split), float32 [1347, 3, 8, 8]; --labels writes their int64 labels.
marker: frames rendered by models/train_marker.py's `render` from numpy.random.default_rng(7)
(training uses seed 0 per run, the held-out set seed 12345), as model tokens [N, 256, 27];
--labels writes their training targets (the heat-map distributions train_marker.py trains on,
float32 [N, 256, 1]) for distill's task loss.
shapes: images rendered by models/train_shapes.py's `render` from default_rng(1000007) (training
uses seeds 0..epochs-1, the held-out set 12345), float32 [N, 3, 32, 32]; --labels their int64 labels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["digits", "marker", "shapes"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--labels", type=Path, help="also write the labels here (marker: target heat maps)")
    ap.add_argument("--frames", type=int, default=4096, help="marker, shapes: frames / images to render")
    ap.add_argument("--seed", type=int, help="generator seed (marker: default 7, shapes: default 1000007; "
                    "never a training or held-out seed)")
    a = ap.parse_args()
    if a.model == "digits":
        import train_digits

        x_tr, y_tr, _, _ = train_digits.load_data()
        np.save(a.out, x_tr)
        if a.labels:
            np.save(a.labels, y_tr)
        print(f"{a.out}: digits training split {list(x_tr.shape)}")
    elif a.model == "shapes":
        import train_shapes

        seed = 1000007 if a.seed is None else a.seed
        if seed == train_shapes.HELDOUT_SEED or seed < 1000:
            sys.exit(f"error: --seed {seed}: train_shapes.py trains on seeds below 1000 and holds out 12345")
        x, y = train_shapes.render(np.random.default_rng(seed), a.frames)
        np.save(a.out, x)
        if a.labels:
            np.save(a.labels, y)
        print(f"{a.out}: shapes images (seed {seed}) {list(x.shape)}")
    else:
        import train_marker

        seed = 7 if a.seed is None else a.seed
        if seed == train_marker.HELDOUT_SEED:
            sys.exit("error: --seed 12345 is the held-out set's seed")
        frames, centres = train_marker.render(np.random.default_rng(seed), a.frames)
        x = train_marker.tokens(frames)
        np.save(a.out, x)
        if a.labels:
            np.save(a.labels, train_marker.targets(centres).astype(np.float32)[..., None])
        print(f"{a.out}: marker frames (seed {seed}) as tokens {list(x.shape)}")


if __name__ == "__main__":
    main()
