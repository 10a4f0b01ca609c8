"""Bad inputs, files and options raise Python exceptions with one-line messages naming the
input or file at fault; nothing panics across into Python."""

import re

import numpy as np
import pytest

import perceiver_edge
from conftest import DIGITS, FIXTURES

X = np.load(DIGITS / "samples" / "digit_0.npy")


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    return msg


def test_wrong_dtype(digits):
    with pytest.raises(ValueError) as e:
        digits.run({"pixel_values": X.astype(np.float64)})
    assert one_line(e) == "input `pixel_values`: dtype float64, expected float32"
    with pytest.raises(ValueError, match=r"input `pixel_values`: dtype int64, expected float32"):
        digits.run({"pixel_values": X.astype(np.int64)})


def test_wrong_shape(digits):
    with pytest.raises(ValueError) as e:
        digits.run({"pixel_values": X[0]})
    assert one_line(e) == "input `pixel_values`: shape [3, 8, 8], expected [1, 3, 8, 8]"
    with pytest.raises(ValueError, match=re.escape("shape [2, 3, 8, 8], expected [1, 3, 8, 8]")):
        digits.run({"pixel_values": np.concatenate([X, X])})


def test_missing_and_unknown_inputs(digits):
    with pytest.raises(ValueError) as e:
        digits.run({})
    assert one_line(e).startswith("input `pixel_values`: missing")
    with pytest.raises(ValueError) as e:
        digits.run({"pixel_values": X, "pixels": X})
    assert "input `pixels`: the model has no such input (it takes pixel_values)" == one_line(e)


def test_not_an_array(digits):
    with pytest.raises(TypeError, match="input `pixel_values`: expected a numpy.ndarray, got list"):
        digits.run({"pixel_values": X.tolist()})
    with pytest.raises(TypeError):
        digits.run([X])
    with pytest.raises(TypeError, match="input names must be str"):
        digits.run({0: X})


def test_out_of_range_token_ids(seqcls_onnx):
    m = perceiver_edge.Model.load(seqcls_onnx)
    spec = m.inputs[0]
    ids = np.full(spec.shape, 10**9, dtype=np.int64)
    with pytest.raises(ValueError) as e:
        m.run({spec.name: ids})
    assert one_line(e).startswith(f"input `{spec.name}`: value 1000000000 at flat index 0 is out of range")


def test_unknown_paths(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError) as e:
        perceiver_edge.Model.load(missing)
    assert str(missing) in one_line(e)
    with pytest.raises(FileNotFoundError, match="nope"):
        perceiver_edge.export(tmp_path / "nope", tmp_path / "out.onnx")
    with pytest.raises(FileNotFoundError):
        perceiver_edge.inspect(missing)
    with pytest.raises(FileNotFoundError):
        perceiver_edge.compare(missing, missing, DIGITS / "samples")
    assert not (tmp_path / "out.onnx").exists()


def test_not_a_model(tmp_path):
    with pytest.raises(ValueError) as e:
        perceiver_edge.Model.load(DIGITS / "config.json")
    assert "config.json: not a loadable ONNX model" in one_line(e)
    with pytest.raises(ValueError, match="is a folder"):
        perceiver_edge.Model.load(DIGITS)
    with pytest.raises(ValueError):
        perceiver_edge.inspect(DIGITS / "README.md")


def test_bad_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        perceiver_edge.export(tmp_path, tmp_path / "out.onnx")
    one_line(e)
    assert not (tmp_path / "out.onnx").exists()


def test_bad_export_options(tmp_path):
    out = tmp_path / "out.onnx"
    with pytest.raises(ValueError) as e:
        perceiver_edge.export(DIGITS, out, precision="int3")
    assert one_line(e) == 'unknown precision "int3" (expected f32, f16, int8, int8-static or q4)'
    with pytest.raises(ValueError, match="--keep-f32 needs a reduced --precision"):
        perceiver_edge.export(DIGITS, out, keep_f32=["decoder"])
    with pytest.raises(ValueError, match="unknown calibration method"):
        perceiver_edge.export(DIGITS, out, precision="int8-static", calibration_method="median")
    with pytest.raises(ValueError, match="--reduce-range .* applies to --precision int8 or int8-static, not q4"):
        perceiver_edge.export(DIGITS, out, precision="q4", reduce_range=True)
    with pytest.raises(ValueError, match="latents=K chooses latents on calibration data"):
        perceiver_edge.export(DIGITS, out, latents=4)
    with pytest.raises(ValueError, match="shape options apply to a checkpoint folder"):
        perceiver_edge.inspect(FIXTURES / "seqcls" / "model.safetensors", batch=2)
    with pytest.raises(OSError):
        perceiver_edge.export(DIGITS, tmp_path / "no" / "such" / "dir" / "out.onnx")
    assert not out.exists()


def test_bench_options(digits):
    with pytest.raises(ValueError, match="threads 0: expected 1 to 256"):
        digits.bench(threads=0)
    with pytest.raises(ValueError, match="threads 100000: expected 1 to 256"):
        digits.bench(threads=100000)
    with pytest.raises(ValueError, match=r"rate -1: expected Hz in"):
        digits.bench(rate=-1.0)
    with pytest.raises(ValueError, match=r"rate 1e-300: expected Hz in"):
        digits.bench(rate=1e-300)
    with pytest.raises(ValueError, match=r"duration 1e20: expected seconds in"):
        digits.bench(duration=1e20)
    with pytest.raises(ValueError, match="runs 0: expected 1 to"):
        digits.bench(runs=0)
    with pytest.raises(ValueError, match="input `pixel_values`: dtype float64"):
        digits.bench(runs=1, inputs={"pixel_values": X.astype(np.float64)})
    with pytest.raises(ValueError, match="threads must be positive"):
        perceiver_edge.set_threads(0)


def test_device():
    with pytest.raises(ValueError, match="unknown device `tpu`"):
        perceiver_edge.Model.load(DIGITS / "config.json", device="tpu")


def test_model_is_not_constructible():
    with pytest.raises(TypeError):
        perceiver_edge.Model()
