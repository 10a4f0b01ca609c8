"""Every reference fixture case (models/reference/fixtures/*/fixture.json, outputs produced by
transformers) exported with perceiver_edge.export and run with Model.run: outputs must match
transformers' within the case's tolerance, |got - expected| <= atol + rtol * |expected|, as in
engine/cli/tests/fixtures.rs."""

import json

import numpy as np
import pytest

import perceiver_edge
from conftest import FIXTURES

# CLI flag -> (keyword of perceiver_edge.export, number of values).
FLAGS = {
    "--seq-len": ("seq_len", 1),
    "--image-size": ("image_size", 2),
    "--batch": ("batch", 1),
    "--decode-subset": ("decode_subset", 1),
    "--image-points": ("image_points", 1),
    "--audio-points": ("audio_points", 1),
    "--attention-mask": ("attention_mask", 0),
    "--no-rewrites": ("no_rewrites", 0),
    "--no-position-tables": ("no_position_tables", 0),
}


def export_kwargs(args):
    """The CLI's export arguments as keyword arguments of perceiver_edge.export."""
    kwargs, i = {}, 0
    while i < len(args):
        if args[i] not in FLAGS:
            raise AssertionError(f"fixture export argument {args[i]} has no keyword here")
        name, n = FLAGS[args[i]]
        values = [int(v) for v in args[i + 1 : i + 1 + n]]
        kwargs[name] = True if n == 0 else values[0] if n == 1 else tuple(values)
        i += 1 + n
    return kwargs


def cases():
    out = []
    for meta_path in sorted(FIXTURES.glob("*/fixture.json")):
        meta = json.loads(meta_path.read_text())
        for case in meta["cases"]:
            atol = case.get("atol", meta.get("atol", 1e-4))
            rtol = case.get("rtol", meta.get("rtol", 1e-5))
            out.append(pytest.param(meta_path.parent, case, atol, rtol, id=f"{meta_path.parent.name}/{case['name']}"))
    return out


CASES = cases()


def test_every_fixture_is_found():
    assert len(CASES) >= 19, f"fixtures missing: found {len(CASES)} cases"


@pytest.mark.parametrize("fixture_dir,case,atol,rtol", CASES)
def test_fixture_matches_transformers(fixture_dir, case, atol, rtol, tmp_path):
    onnx = tmp_path / f"{fixture_dir.name}__{case['name']}.onnx"
    summary = perceiver_edge.export(fixture_dir, onnx, **export_kwargs(case["export_args"]))
    assert summary["path"] == str(onnx) and summary["file_bytes"] == onnx.stat().st_size

    model = perceiver_edge.Model.load(onnx)
    specs = {s.name: s for s in model.inputs}
    assert sorted(specs) == sorted(i["name"] for i in case["inputs"])
    inputs = {}
    for i in case["inputs"]:
        assert specs[i["name"]].dtype == i["dtype"] and list(specs[i["name"]].shape) == i["shape"]
        inputs[i["name"]] = np.load(fixture_dir / i["file"])

    got = model.run(inputs)
    assert list(got) == [s.name for s in model.outputs]
    assert sorted(got) == sorted(o["name"] for o in case["outputs"])
    for o in case["outputs"]:
        want = np.load(fixture_dir / o["file"])
        y = got[o["name"]]
        assert y.dtype == np.dtype(o["dtype"]) and y.shape == want.shape, o["name"]
        err = np.abs(y.astype(np.float64) - want.astype(np.float64))
        tol = atol + rtol * np.abs(want.astype(np.float64))
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        assert (err <= tol).all(), (
            f"{o['name']}{list(worst)}: got {y[worst]}, transformers {want[worst]} "
            f"(|err| {err[worst]:.3e} > {tol[worst]:.3e})"
        )
