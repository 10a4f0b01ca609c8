#!/usr/bin/env python3
"""Write calibration data for `perceiver-edge distill` / `tune --recover` on the bundled models.

Recovery must never see the held-out samples the model cards measure on, so the calibration
sets come from the training side:

    python models/make_calibration.py digits OUT.npy [--labels L.npy]   # the 1347 training images
    python models/make_calibration.py marker OUT.npy [--frames N]        # N fresh frames, seed 7

digits: the training split of models/train_digits.py (scikit-learn's load_digits, the same
stratified split), float32 [1347, 3, 8, 8]; --labels writes their int64 labels.
marker: frames rendered by models/train_marker.py's `render` from numpy.random.default_rng(7)
(training uses seed 0 per run, the held-out set seed 12345), as model tokens [N, 256, 27].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=["digits", "marker"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--labels", type=Path, help="digits: also write the training labels here")
    ap.add_argument("--frames", type=int, default=4096, help="marker: frames to render")
    ap.add_argument("--seed", type=int, default=7, help="marker: generator seed (not 12345)")
    a = ap.parse_args()
    if a.model == "digits":
        import train_digits

        x_tr, y_tr, _, _ = train_digits.load_data()
        np.save(a.out, x_tr)
        if a.labels:
            np.save(a.labels, y_tr)
        print(f"{a.out}: digits training split {list(x_tr.shape)}")
    else:
        import train_marker

        if a.seed == train_marker.HELDOUT_SEED:
            sys.exit("error: --seed 12345 is the held-out set's seed")
        frames, _ = train_marker.render(np.random.default_rng(a.seed), a.frames)
        x = train_marker.tokens(frames)
        np.save(a.out, x)
        print(f"{a.out}: marker frames (seed {a.seed}) as tokens {list(x.shape)}")


if __name__ == "__main__":
    main()
