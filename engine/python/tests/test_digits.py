"""The bundled digits model through the Python API: export, inspect, run on the bundled samples
(bit-identical to `perceiver-edge run`), compare, bench."""

import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest

import perceiver_edge
from conftest import DIGITS

SAMPLES = sorted((DIGITS / "samples").glob("digit_*.npy"))
LABELS = json.loads((DIGITS / "samples" / "labels.json").read_text())


def test_export_summary(digits_onnx):
    s = perceiver_edge.inspect(digits_onnx)
    assert s["architecture"] == "PerceiverForImageClassificationFourier"
    assert s["path"] == str(digits_onnx)
    assert s["precision"] == "f32" and s["summary_stored"] is True
    assert s["file_bytes"] == digits_onnx.stat().st_size
    assert s["inputs"] == [["pixel_values", "f32", [1, 3, 8, 8]]]
    assert s["outputs"] == [["logits", "f32", [1, 10]]]
    assert s["resident_weight_bytes"] == sum(s["resident_weights"].values()) > 0
    for key in ["dims", "depth", "heads", "batch", "parameters", "flops", "weight_bytes", "largest_activation"]:
        assert key in s, key


def test_export_returns_the_summary_inspect_reads(digits_onnx, tmp_path):
    out = tmp_path / "digits.onnx"
    exported = perceiver_edge.export(DIGITS, out)
    assert exported["precision"] == "f32" and exported["file_bytes"] == out.stat().st_size
    assert out.read_bytes() == digits_onnx.read_bytes(), "exports are deterministic"
    inspected = perceiver_edge.inspect(out)
    for key in ["architecture", "dims", "parameters", "flops", "weight_bytes", "inputs", "outputs", "rewrites"]:
        assert exported[key] == inspected[key], key
    # A checkpoint folder describes the graph it would export.
    folder = perceiver_edge.inspect(DIGITS)
    assert folder["parameters"] == exported["parameters"] and folder["path"] == str(DIGITS)
    assert perceiver_edge.inspect(DIGITS, batch=2)["batch"] == 2


def test_model_io(digits, digits_onnx):
    assert [(s.name, s.dtype, s.shape) for s in digits.inputs] == [("pixel_values", "float32", (1, 3, 8, 8))]
    assert [(s.name, s.dtype, s.shape) for s in digits.outputs] == [("logits", "float32", (1, 10))]
    assert digits.path == str(digits_onnx) and digits.precision == "f32"
    assert digits.summary["architecture"] == "PerceiverForImageClassificationFourier"
    assert digits.inputs[0] == perceiver_edge.Model.load(digits_onnx).inputs[0]
    assert repr(digits.inputs[0]) == "TensorSpec(name='pixel_values', dtype='float32', shape=(1, 3, 8, 8))"
    assert repr(digits).startswith(f"Model('{digits_onnx}', precision='f32', inputs=[pixel_values: float32[1, 3, 8, 8]]")


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_run_matches_cli_exactly(digits, digits_onnx, cli, sample, tmp_path):
    x = np.load(sample)
    y = digits.run({"pixel_values": x})["logits"]
    out = tmp_path / "y.npy"
    subprocess.run([cli, "run", digits_onnx, "--input", sample, "--output", out], check=True, capture_output=True)
    want = np.load(out)
    assert y.dtype == want.dtype and y.shape == want.shape
    assert np.array_equal(y, want), f"{sample.name}: {y} != CLI {want}"
    assert int(np.argmax(y)) == LABELS[sample.name]


def test_cli_export_is_byte_identical(digits_onnx, cli, tmp_path):
    out = tmp_path / "cli.onnx"
    subprocess.run([cli, "export", DIGITS, "-o", out], check=True, capture_output=True)
    assert out.read_bytes() == digits_onnx.read_bytes()


def test_outputs_are_numpy_views_without_copy(digits):
    x = np.load(SAMPLES[0])
    y = digits.run({"pixel_values": x})["logits"]
    assert isinstance(y, np.ndarray) and not y.flags.owndata and y.base is not None
    assert y.flags.c_contiguous and y.flags.writeable
    y2 = digits.run({"pixel_values": x})["logits"]
    y[...] = 0  # each run returns its own buffers
    assert not np.array_equal(y, y2)


def test_non_contiguous_input(digits):
    x = np.load(SAMPLES[1])
    fortran = np.asfortranarray(x)
    strided = np.repeat(x, 2, axis=3)[..., ::2]
    assert not fortran.flags.c_contiguous and not strided.flags.c_contiguous
    want = digits.run({"pixel_values": x})["logits"]
    assert np.array_equal(digits.run({"pixel_values": fortran})["logits"], want)
    assert np.array_equal(digits.run({"pixel_values": strided})["logits"], want)


def test_threads_share_a_model(digits):
    xs = [np.load(p) for p in SAMPLES]
    want = [digits.run({"pixel_values": x})["logits"] for x in xs]
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                got[i] = digits.run({"pixel_values": xs[i]})["logits"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(len(xs)):
        assert np.array_equal(got[i], want[i])


def test_gil_is_released_while_running(digits):
    # A 1 s bench in another thread: with the GIL held, this thread could not loop meanwhile
    # (it would only get the few ms before the call starts).
    done = threading.Event()
    t = threading.Thread(target=lambda: (digits.bench(warmup=0, duration=1.0), done.set()))
    t.start()
    time.sleep(0.2)  # the bench has started
    loops, start = 0, time.perf_counter()
    while not done.is_set():
        loops += 1
    elapsed = time.perf_counter() - start
    t.join()
    assert elapsed > 0.3 and loops > 100_000, (elapsed, loops)


def test_compare_identical_and_int8(digits_onnx, tmp_path):
    data = DIGITS / "samples" / "heldout_inputs.npy"
    labels = DIGITS / "samples" / "heldout_labels.npy"
    same = perceiver_edge.compare(digits_onnx, digits_onnx, data, labels)
    n = np.load(data).shape[0]
    assert same["samples"] == n
    assert same["top1_agreement"] == 1.0
    assert same["outputs"][0]["name"] == "logits" and same["outputs"][0]["stats"]["max_abs"] == 0.0
    assert same["accuracy"]["reference"] == same["accuracy"]["candidate"] > 0.8
    assert same["layers"]

    int8 = tmp_path / "digits.int8.onnx"
    s = perceiver_edge.export(DIGITS, int8, precision="int8")
    assert s["precision"] == "int8" and s["weight_bytes"] < perceiver_edge.inspect(digits_onnx)["weight_bytes"]
    assert perceiver_edge.Model.load(int8).precision == "int8"
    r = perceiver_edge.compare(digits_onnx, int8, data, layers=False)
    assert set(r) == {"samples", "outputs", "top1_agreement", "accuracy", "layers"}
    assert r["layers"] == [] and r["accuracy"] is None
    assert set(r["outputs"][0]["stats"]) == {"max_abs", "mean_abs", "cosine", "rel_max", "rel_l2"}
    assert r["outputs"][0]["stats"]["cosine"] > 0.99 and r["top1_agreement"] > 0.9


def cli_bench_keys(cli, onnx, *args):
    out = subprocess.run([cli, "bench", onnx, "--runs", "3", "--warmup", "1", "--json", *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_bench_mirrors_cli_report(digits, digits_onnx, cli):
    r = digits.bench(runs=5, warmup=2, threads=1)
    want = cli_bench_keys(cli, digits_onnx)
    assert set(r) == set(want)
    assert set(r["latency_ms"]) == set(want["latency_ms"]) == {"min", "mean", "p50", "p90", "p99", "max", "stddev"}
    assert set(r["memory"]) == set(want["memory"])
    assert r["model"] == str(digits_onnx) and r["precision"] == "f32"
    assert (r["runs"], r["warmup"], r["threads"]) == (5, 2, 1)
    assert r["paced"] is None
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["throughput_per_s"] > 0 and r["load_ms"] > 0
    assert r["memory"]["peak_rss"] > 0 and r["memory"]["peak_heap"] > 0


def test_bench_paced_threads_and_inputs(digits, digits_onnx, cli):
    x = np.load(SAMPLES[2])
    r = digits.bench(runs=4, warmup=0, threads=2, rate=200.0, inputs={"pixel_values": x})
    want = cli_bench_keys(cli, digits_onnx, "--rate", "200")
    assert set(r["paced"]) == set(want["paced"])
    assert r["paced"]["rate_hz"] == 200.0 and r["threads"] == 2 and r["runs"] == 4
    # bench's threads do not outlive it: runs stay bit-identical to the CLI's single-threaded run.
    y = digits.run({"pixel_values": x})["logits"]
    assert np.array_equal(y, digits.run({"pixel_values": x})["logits"])
    r = digits.bench(warmup=0, duration=0.05)
    assert r["runs"] >= 1


def test_set_threads(digits):
    x = np.load(SAMPLES[0])
    want = digits.run({"pixel_values": x})["logits"]
    perceiver_edge.set_threads(2)
    try:
        np.testing.assert_allclose(digits.run({"pixel_values": x})["logits"], want, rtol=1e-5, atol=1e-5)
    finally:
        perceiver_edge.set_threads(1)
    assert np.array_equal(digits.run({"pixel_values": x})["logits"], want)


def test_warm_up(digits_onnx):
    x = {"pixel_values": np.load(SAMPLES[0])}
    model = perceiver_edge.Model.load(digits_onnx)
    assert model.warm_up(x, 3) == 3  # one thread: nothing to choose
    assert model.warm_up(x, 0) == 0
    # Runs at one thread are not counted: there is no pool to choose.
    assert model.pool_use() == {"pool_runs": 0, "one_thread_runs": 0, "pool_share": None}
    perceiver_edge.set_threads(2)
    try:
        # digits' runs are short (well under 20 ms): the engine times its pool against one thread
        # before it chooses, in more runs than asked when there are two cores to choose between.
        made = model.warm_up(x, 1)
        assert 1 <= made <= 13
        if len(os.sched_getaffinity(0)) >= 2:
            assert made > 1
        assert model.warm_up(x, 2) == 2, "once chosen, exactly the runs asked for"
        if len(os.sched_getaffinity(0)) >= 2:
            # Every run at two threads counted once, the trial's first on the pool.
            used = model.pool_use()
            assert used["pool_runs"] + used["one_thread_runs"] == made + 2, used
            assert used["pool_runs"] >= 1, used
            assert used["pool_share"] is None or 0 < used["pool_share"] <= 1.01, used
    finally:
        perceiver_edge.set_threads(1)
    with pytest.raises(ValueError, match="pixel_values"):
        model.warm_up({"pixel_values": np.zeros((1, 2), np.float32)})


@pytest.mark.parametrize("precision", ["f16", "int8", "int8-static", "q4"])
def test_reduced_precision_exports(digits_onnx, precision, tmp_path):
    out = tmp_path / f"digits.{precision}.onnx"
    s = perceiver_edge.export(DIGITS, out, precision)  # int8-static calibrates on samples/
    assert s["precision"] == precision
    m = perceiver_edge.Model.load(out)
    assert m.precision == precision and m.inputs == perceiver_edge.Model.load(digits_onnx).inputs
    r = perceiver_edge.compare(digits_onnx, out, DIGITS / "samples" / "heldout_inputs.npy", layers=False)
    assert r["top1_agreement"] >= 0.97 and r["outputs"][0]["stats"]["cosine"] > 0.99


def test_latent_budget(tmp_path):
    out = tmp_path / "digits.k8.onnx"
    s = perceiver_edge.export(DIGITS, out, latents=8, blocks=1, calibrate=DIGITS / "samples" / "heldout_inputs.npy")
    assert len(s["latents_kept"]) == 8 and s["latents_kept"] == sorted(s["latents_kept"])
    assert s["dims"]["N"] == 8
    y = perceiver_edge.Model.load(out).run({"pixel_values": np.load(SAMPLES[3])})["logits"]
    assert y.shape == (1, 10)
