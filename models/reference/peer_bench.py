#!/usr/bin/env python3
"""perceiver-edge vs onnxruntime at real sizes (issue #11 item 1): latency and fidelity of the
bench model (bench_vs_onnxruntime.py) and of the published PerceiverIO architectures (published.py:
vision-fourier, vision-learned, vision-conv at 224x224, language at sequence 2048; on request optical
flow at 368x496; random weights).

Usage (from the repository root, after ``cargo build --release``):

    /work/refvenv/bin/python models/reference/peer_bench.py [--models bench,vision-conv,...]
        [--precisions f32,f16,int8,int8-7bit,q4] [--threads 1,2,all] [--rounds 3] [--runs R] [--warmup W]
        [--work DIR] [--bin target/release/perceiver-edge] [--skip-torch-export] [--reexport]
        [--in-process] [--busy-core N] [--one-session] [--json FILE]

For each model: checkpoints go to WORK/MODEL/ (generated once with seeded random weights, reused
when WORK/MODEL/model.safetensors exists); a seeded input (images: standard normal [1, 3, H, W];
language: token ids in [0, 262) [1, 2048] with an attention mask of ones; flow: standard normal
[1, 2, 27, 368, 496], two frames' 3x3 patches) and transformers' output
for it (torch, eval, no_grad) are cached as WORK/MODEL.in.NAME.npy and WORK/MODEL.ref.npy. For
each precision the script exports WORK/MODEL-PREC.onnx with ``perceiver-edge export`` (int8-7bit:
``--precision int8 --reduce-range``, 7-bit weights; reused when
newer than the checkpoint, unless --reexport) and, for f32, transformers' own graph
WORK/MODEL-torch.onnx with ``torch.onnx.export`` (opset 17, TorchScript exporter). For each thread
count it creates onnxruntime sessions (CPU provider, intra-op T, inter-op 1, sequential, all
graph optimisations) and warms them up; then each round times, for each thread count in turn,
(a) onnxruntime on the perceiver-edge graph, (b) onnxruntime on transformers' export (f32 only),
(c) ``perceiver-edge bench --json`` (p50), or with --in-process perceiver-edge's Python package
(``perceiver_edge.Model``, loaded once, warmed up after each change of threads) timed in this
process, the order of (a)-(c) reversed every other round. Reported: medians over rounds of the times and of the per-round ratios
engine / onnxruntime, the max abs difference to transformers of perceiver-edge (``perceiver-edge
run``) and of onnxruntime, a markdown table, each row's range of per-round ratios (and how many
are at or under 1.0) and the thread scaling (p50 at the fewest threads /
p50 at T, the median of the per-round ratios). Defaults: --runs 20 and --warmup 3 for the bench
model, 3 and 1 for the published ones.

--models flow (optical flow at 368x496, not in the default list: 10-30 s a run at one thread)
runs each onnxruntime timed series in a child process that makes, warms up and times its own
session (as --one-session does for any model): onnxruntime held 7.6 GiB after two runs on
perceiver-edge's graph and 13.4 GiB on transformers' export, more than a 24 GiB host has for four
held sessions, and a session dropped in this process did not give its memory back.

--busy-core N (Linux) runs a busy loop pinned to CPU N from each graph's sessions to its last round
(warm-ups included): a neighbour process taking one of the cores, as another node of a robot does.
Both engines then run beside it; their thread scaling shows what a second thread is worth then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_onnxruntime import build_model  # noqa: E402
from published import ARCHS, generate  # noqa: E402

MODELS = ["bench", "vision-fourier", "vision-learned", "vision-conv", "language"]
# Taken when named in --models, not by default, and with onnxruntime's sessions one at a time
# (as --one-session does): see the module's note on --models flow.
ON_REQUEST = ["flow"]
PRECISIONS = ["f32", "f16", "int8", "int8-7bit", "q4"]
# Export flags of each precision: int8-7bit is int8 with 7-bit weights (`--reduce-range`).
EXPORT_FLAGS = {"int8-7bit": ["--precision", "int8", "--reduce-range"]}
SEQ_LEN = 2048


def say(msg: str) -> None:
    print(msg, flush=True)


def fresh(path: Path, than: Path) -> bool:
    return path.is_file() and path.stat().st_mtime > than.stat().st_mtime


def checkpoint(name: str, work: Path) -> Path:
    ck = work / name
    if not (ck / "model.safetensors").is_file():
        say(f"[{name}] generating the checkpoint in {ck}")
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if name == "bench":
            build_model(str(ck))
        else:
            assert name in ARCHS
            generate(name, ck)
    return ck


def load_torch(ck: Path):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls = json.loads((ck / "config.json").read_text())["architectures"][0]
    return getattr(transformers, cls).from_pretrained(ck).eval()


def make_inputs(name: str, ck: Path, work: Path) -> dict[str, np.ndarray]:
    """The seeded inputs of `name` by graph-input name, cached in WORK."""
    rng = np.random.default_rng(0)
    if name == "language":
        arrays = {"input_ids": rng.integers(0, 262, size=(1, SEQ_LEN), dtype=np.int64),
                  "attention_mask": np.ones((1, SEQ_LEN), dtype=np.int64)}
    elif name == "flow":
        size = json.loads((ck / "config.json").read_text())["train_size"]
        arrays = {"inputs": rng.standard_normal((1, 2, 27, *size)).astype(np.float32)}
    else:
        size = json.loads((ck / "config.json").read_text())["image_size"]
        h, w = (size, size) if isinstance(size, int) else size
        arrays = {"pixel_values": rng.standard_normal((1, 3, h, w)).astype(np.float32)}
    for k, x in arrays.items():
        path = work / f"{name}.in.{k}.npy"
        if not path.is_file() or not np.array_equal(np.load(path), x):
            np.save(path, x)
    return arrays


def logits_module(model, names):
    """transformers' model as a module of positional inputs `names` returning logits (for tracing)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *xs):
            return self.m(**dict(zip(names, xs))).logits

    return Logits().eval()


def graph_io(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(non-initializer inputs as (name, onnx elem type), output names) of an ONNX file (as `inspect` lists)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    ins = [(i.name, i.type.tensor_type.elem_type) for i in g.input if i.name not in inits]
    return ins, [o.name for o in g.output]


def graph_feed(path: Path, name: str, feeds: dict, work: Path):
    """(output names, {input: array} in graph order, its `.npy` files in WORK) for `path`'s inputs,
    from the inputs `make_inputs` saved (the engine keeps f32 / int64 inputs at every precision);
    raises RuntimeError for an input this script does not make."""
    ins, outs = graph_io(path)
    missing = [n for n, _ in ins if n not in feeds]
    if missing:
        raise RuntimeError(f"graph input(s) {missing} unknown to this script")
    feed = {n: feeds[n] for n, _ in ins}
    return outs, feed, [work / f"{name}.in.{n}.npy" for n in feed]


def named_inputs(feed: dict, files: list[Path]) -> list[str]:
    """`run`'s `--input NAME=FILE` arguments."""
    return sum((["--input", f"{n}={f}"] for n, f in zip(feed, files)), [])


def session(path: Path, threads: int, feed, warmup: int):
    """(onnxruntime session, first output of the last warm-up run), or (None, None) if it fails."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return sess, ort_time(sess, feed, max(warmup, 1))[1]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several kinds; report and go on
        say(f"  onnxruntime cannot run {path.name}: {str(e).strip()[:300]}")
        return None, None


class OrtPeer:
    """onnxruntime on one graph at `threads` intra-op threads. With `hold` its session is made
    (and warmed up) here and kept. Without, each timed series runs in a child process that makes
    the session, warms it up, times the runs and exits, so that one session at a time holds memory
    and its memory goes back with the process (why: the module's note on --models flow). Making
    and warming up stay untimed either way. `first_out` is the first output of its first warm-up series (None
    while none ran, or if onnxruntime cannot run the graph)."""

    def __init__(self, path: Path, threads: int, feed: dict, warmup: int, hold: bool):
        self.path, self.threads, self.feed, self.warmup, self.hold = path, threads, feed, warmup, hold
        self.sess = self.first_out = None
        self.failed = False
        if hold:
            self.sess, self.first_out = session(path, threads, feed, warmup)
            self.failed = self.sess is None

    def time(self, runs: int) -> float | None:
        """Median ms of `runs` runs, None if onnxruntime cannot run the graph."""
        if self.failed:
            return None
        if self.hold:
            return ort_time(self.sess, self.feed, runs)[0]
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads of this one's
        with ctx.Pool(1) as pool:
            ms, out = pool.apply(child_series, (self.path, self.threads, self.feed, self.warmup, runs))
        self.failed = ms is None
        if self.first_out is None:
            self.first_out = out
        return ms


def child_series(path: Path, threads: int, feed: dict, warmup: int, runs: int):
    """(median ms of `runs` runs, first output of the warm-up) of a new session on `path`, (None,
    None) if onnxruntime cannot run it (`OrtPeer`'s child process)."""
    sess, out = session(path, threads, feed, warmup)
    return (ort_time(sess, feed, runs)[0], out) if sess is not None else (None, None)


def ort_time(sess, feed, runs: int):
    """(median ms of `runs` runs, the first output of the last run)."""
    ts, out = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        out = sess.run(None, feed)[0]
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), out


def engine(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {r.returncode}: {r.stderr.strip()[-1500:]}")
    return r.stdout


def engine_p50(cmd: list[str], tag: str, threads: int) -> float | None:
    """p50 of `perceiver-edge bench --json` (`cmd`), None (said) if it fails."""
    try:
        return json.loads(engine(cmd))["latency_ms"]["p50"]
    except RuntimeError as ex:
        say(f"{tag} T={threads}: perceiver-edge bench failed: {ex}")
        return None


# Between two timed series in one process: long enough for a thread pool that spins after its
# last run (onnxruntime's, by default) to stop before the other engine's series starts.
PAUSE_S = 0.05


class InProcess:
    """perceiver-edge timed in this process (`--in-process`): the Python package's `Model`, loaded
    once, its runs alternated with onnxruntime's in each round, so that both are timed seconds
    apart on the same warm process instead of a new `perceiver-edge bench` process (load included)
    between them."""

    def __init__(self, path: Path, feed: dict, warmup: int):
        import perceiver_edge

        self.pe = perceiver_edge
        self.model = perceiver_edge.Model.load(path)
        # One thread until the first timed series, as `perceiver-edge run` computes the output.
        perceiver_edge.set_threads(1)
        self.feed, self.warmup, self.at = feed, warmup, None

    def threads(self, t: int) -> None:
        """Runs on `t` threads from now, warmed up after a change (`Model.warm_up`: `warmup` runs,
        and at several threads the runs the engine takes to choose between its pool and one
        thread)."""
        if t != self.at:
            self.pe.set_threads(t)
            self.at = t
            self.model.warm_up(self.feed, max(self.warmup, 1))

    def time(self, runs: int) -> float:
        """Median ms of `runs` runs (after `threads`)."""
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.model.run(self.feed)
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)


@contextlib.contextmanager
def busy(core: int | None):
    """A busy loop pinned to CPU `core` while the block runs (nothing when None)."""
    if core is None:
        yield
        return
    loop = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        time.sleep(0.2)
        if loop.poll() is not None:
            raise RuntimeError(f"--busy-core {core}: the busy loop exited {loop.returncode}")
        yield
    finally:
        loop.kill()
        loop.wait()


def max_abs(a, ref) -> float | None:
    return None if a is None else float(np.abs(np.asarray(a, dtype=np.float32) - ref).max())


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".2f", ms=False) -> str:
    return "n/a" if x is None else format(x, spec) + (" ms" if ms else "")


def times(x) -> str:
    """A speed-up as `1.23x`, or n/a."""
    return "n/a" if x is None else f"{x:.2f}x"


def reference(name, ck, feeds, a):
    """transformers' output for `feeds` (cached) and its ONNX export (None if skipped or failed)."""
    model = None
    ref_path = a.work / f"{name}.ref.npy"
    if fresh(ref_path, ck / "model.safetensors"):
        ref = np.load(ref_path)
        say(f"[{name}] transformers reference: cached {ref_path}")
    else:
        import torch

        model = load_torch(ck)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        np.save(ref_path, ref)
        say(f"[{name}] transformers reference: {(time.perf_counter() - t0):.1f} s, saved {ref_path}")

    torch_path = a.work / f"{name}-torch.onnx"
    if a.skip_torch_export or "f32" not in a.precisions:
        torch_path = None
    elif fresh(torch_path, ck / "model.safetensors"):
        say(f"[{name}] transformers' ONNX export: reusing {torch_path}")
    else:
        import torch

        model = model or load_torch(ck)
        names = list(feeds)
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
                torch.onnx.export(logits_module(model, names), tuple(torch.from_numpy(feeds[k]) for k in names),
                                  str(torch_path), opset_version=17, input_names=names, output_names=["logits"],
                                  dynamo=False)
            say(f"[{name}] transformers' ONNX export: {(time.perf_counter() - t0):.1f} s -> {torch_path}")
        except Exception as e:  # noqa: BLE001 - any exporter failure makes that column n/a
            say(f"[{name}] transformers' ONNX export failed, column n/a: {type(e).__name__}: {str(e).strip()[:300]}")
            torch_path.unlink(missing_ok=True)
            torch_path = None
    return ref, torch_path


def exported(a, name: str, prec: str, ck: Path) -> Path:
    """WORK/NAME-PREC.onnx, exported from `ck` unless a newer one is there (and not
    `a.reexport`); raises RuntimeError if the export fails."""
    path = a.work / f"{name}-{prec}.onnx"
    tag = f"[{name} {prec}]"
    if getattr(a, "reexport", False) or not fresh(path, ck / "model.safetensors"):
        t0 = time.perf_counter()
        size = ["--seq-len", str(SEQ_LEN)] if name == "language" else []
        try:
            engine([a.bin, "export", str(ck), "-o", str(path)] + EXPORT_FLAGS.get(prec, ["--precision", prec]) + size)
        except RuntimeError:
            path.unlink(missing_ok=True)
            raise
        say(f"{tag} perceiver-edge export: {(time.perf_counter() - t0):.1f} s -> {path}")
    else:
        say(f"{tag} perceiver-edge export: reusing {path}")
    return path


def prepared(name: str, a, runs: tuple[int, int], warmup: tuple[int, int]):
    """(checkpoint, seeded inputs, runs, warm-up runs, transformers' output, its ONNX export) of
    `name`: runs and warm-up are `a.runs` / `a.warmup` where given, else the first of each pair for
    the bench model and the second for the published ones."""
    ck = checkpoint(name, a.work)
    feeds = make_inputs(name, ck, a.work)
    pick = 0 if name == "bench" else 1
    ref, torch_path = reference(name, ck, feeds, a)
    return ck, feeds, a.runs or runs[pick], warmup[pick] if a.warmup is None else a.warmup, ref, torch_path


def bench_model(name, a, threads, rows):
    work = a.work
    ck, feeds, runs, warmup, ref, torch_path = prepared(name, a, runs=(20, 3), warmup=(3, 1))

    for prec in a.precisions:
        tag = f"[{name} {prec}]"
        try:
            pe_path = exported(a, name, prec, ck)
            outs, feed, files = graph_feed(pe_path, name, feeds, work)
            out_dir = work / f"{name}-{prec}-peer-out"
            out_dir.mkdir(exist_ok=True)
            engine([a.bin, "run", str(pe_path)] + named_inputs(feed, files) + ["--output", str(out_dir)])
            err_engine = max_abs(np.load(out_dir / f"{outs[0]}.npy"), ref)
        except RuntimeError as e:
            say(f"{tag} skipped: {e}")
            continue
        say(f"{tag} inputs {', '.join(f'{n} {x.dtype} {list(x.shape)}' for n, x in feed.items())}; "
            f"max |perceiver-edge - transformers| = {err_engine:.3g}")
        with busy(a.busy_core):
            use_torch = torch_path if prec == "f32" else None
            hold = not (a.one_session or name in ON_REQUEST)
            sessions = {t: (OrtPeer(pe_path, t, feed, warmup, hold),
                            OrtPeer(use_torch, t, feeds, warmup, hold) if use_torch else None) for t in threads}
            inproc = None
            if a.in_process:
                try:
                    inproc = InProcess(pe_path, feed, warmup)
                    out = inproc.model.run(feed)[outs[0]]
                except (ValueError, RuntimeError, OSError) as ex:
                    say(f"{tag} skipped: the Python package cannot run {pe_path.name}: {ex}")
                    continue
                say(f"{tag} in process, one thread: max |perceiver_edge.Model - transformers| = {max_abs(out, ref):.3g}")
            # Thread counts interleaved within each round, so that a slow phase of a shared host
            # falls on every thread count alike and the per-round scaling compares like with like.
            rounds = {t: [] for t in threads}
            for r in range(a.rounds):
                for t in threads:
                    same, peer = sessions[t]
                    cmd = [a.bin, "bench", str(pe_path), "--runs", str(runs), "--warmup", str(warmup),
                           "--threads", str(t), "--json"] + sum((["--input", str(f)] for f in files), [])
                    timers = [lambda: same.time(runs),
                              lambda: peer.time(runs) if peer else None,
                              (lambda: inproc.time(runs)) if inproc else (lambda: engine_p50(cmd, tag, t))]
                    if inproc:
                        inproc.threads(t)
                    # In one process the order alternates too: onnxruntime first, then last.
                    order = [2, 1, 0] if inproc and r % 2 else [0, 1, 2]
                    times = [None] * 3
                    for i in order:
                        times[i] = timers[i]()
                        if inproc:
                            time.sleep(PAUSE_S)
                    o, p, e = times
                    rr = dict(engine_ms=e, ort_same_ms=o, ort_torch_ms=p,
                              ratio_same=e / o if e and o else None, ratio_torch=e / p if e and p else None)
                    rounds[t].append(rr)
                    say(f"{tag} T={t} round {r}: perceiver-edge {fmt(e, ms=True)}, onnxruntime same graph "
                        f"{fmt(o, ms=True)} (ratio {fmt(rr['ratio_same'], '.3f')}), onnxruntime on transformers' "
                        f"export {fmt(p, ms=True)} (ratio {fmt(rr['ratio_torch'], '.3f')})")
            firsts = [[p.first_out for p in pair if p] for pair in sessions.values()]
            err_ort = next((max_abs(f[0], ref) for f in firsts if f[0] is not None), None)
            err_torch = next((max_abs(f[1], ref) for f in firsts if len(f) > 1 and f[1] is not None), None)
            del sessions, inproc
            for t in threads:
                rows.append(dict(model=name, precision=prec, threads=t, runs=runs, warmup=warmup,
                                 engine_ms=med(r["engine_ms"] for r in rounds[t]),
                                 ort_same_ms=med(r["ort_same_ms"] for r in rounds[t]),
                                 ort_torch_ms=med(r["ort_torch_ms"] for r in rounds[t]),
                                 ratio_same=med(r["ratio_same"] for r in rounds[t]),
                                 ratio_torch=med(r["ratio_torch"] for r in rounds[t]), rounds=rounds[t],
                                 max_abs_engine=err_engine, max_abs_ort_same=err_ort, max_abs_ort_torch=err_torch))
            say(f"{tag} max |x - transformers|: perceiver-edge {fmt(err_engine, '.3g')}, onnxruntime same graph "
                f"{fmt(err_ort, '.3g')}, onnxruntime on transformers' export {fmt(err_torch, '.3g')}")


def scaling(rows) -> list[dict]:
    """Per (model, precision): time at the fewest threads over time at each other thread count,
    as the median of the per-round ratios (thread counts are interleaved within a round)."""
    out = []
    for key in dict.fromkeys((r["model"], r["precision"]) for r in rows):
        group = sorted((r for r in rows if (r["model"], r["precision"]) == key), key=lambda r: r["threads"])
        base = group[0]
        for r in group[1:]:
            s = {k: med(b[k] / x[k] if b[k] and x[k] else None for b, x in zip(base["rounds"], r["rounds"]))
                 for k in ("engine_ms", "ort_same_ms", "ort_torch_ms")}
            out.append(dict(model=key[0], precision=key[1], base_threads=base["threads"], threads=r["threads"], **s))
    return out


def spread(rounds: list[dict], key: str) -> str:
    """The range of the per-round ratios `key` over `rounds` and how many are at or under 1.0 (the
    medians in the table hide how far a noisy host spreads them)."""
    xs = [r[key] for r in rounds if r[key]]
    if not xs:
        return "n/a"
    return f"{min(xs):.3f}-{max(xs):.3f} ({sum(x <= 1.0 for x in xs)} of {len(xs)} at or under 1.0)"


def checked_args(a, prefix: str) -> list[int] | None:
    """Splits `a.models` and `a.precisions` into lists and checks them, the counts and `a.bin`;
    makes `a.work` (a new temporary folder named PREFIX... if not given), which must lie outside
    this repository. Returns the thread counts (`all` = every CPU), or None after printing what is
    wrong."""
    a.models = a.models.split(",")
    a.precisions = a.precisions.split(",")
    for what, got, known in (("--models", a.models, MODELS + ON_REQUEST), ("--precisions", a.precisions, PRECISIONS)):
        bad = [x for x in got if x not in known]
        if bad:
            print(f"{what}: unknown {', '.join(map(repr, bad))} (expected one of {', '.join(known)})", file=sys.stderr)
            return None
    try:
        threads = list(dict.fromkeys(os.cpu_count() if t == "all" else int(t) for t in a.threads.split(",")))
        assert all(t >= 1 for t in threads) and a.rounds >= 1 and (a.runs or 1) >= 1 and (a.warmup or 0) >= 0
    except (ValueError, AssertionError):
        print("--threads: positive integers or 'all'; --rounds, --runs >= 1; --warmup >= 0", file=sys.stderr)
        return None
    if a.in_process:
        try:
            import perceiver_edge  # noqa: F401
        except ImportError:
            print("--in-process: the Python package is not installed in this Python "
                  f"({sys.executable}): pip install ./engine/python", file=sys.stderr)
            return None
    if a.busy_core is not None and not (hasattr(os, "sched_setaffinity") and 0 <= a.busy_core < (os.cpu_count() or 1)):
        print(f"--busy-core {a.busy_core}: expected a CPU from 0 to {(os.cpu_count() or 1) - 1} (Linux)", file=sys.stderr)
        return None
    if not Path(a.bin).is_file():
        print(f"--bin: {a.bin} not found (cargo build --release)", file=sys.stderr)
        return None
    repo = Path(__file__).resolve().parents[2]
    a.work = (a.work or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    if a.work == repo or repo in a.work.parents:
        print(f"--work: {a.work} is inside the repository; use a folder outside it", file=sys.stderr)
        return None
    a.work.mkdir(parents=True, exist_ok=True)
    return threads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS + ON_REQUEST)} (default all but {', '.join(ON_REQUEST)})")
    ap.add_argument("--precisions", default="f32", help=f"comma-separated, of: {', '.join(PRECISIONS)}")
    ap.add_argument("--threads", default="1,2,all", help="comma-separated thread counts; all = os.cpu_count()")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each times every thread count in turn)")
    ap.add_argument("--runs", type=int, help="timed runs per measurement [20 for bench, 3 for published]")
    ap.add_argument("--warmup", type=int, help="warm-up runs [3 for bench, 1 for published]")
    ap.add_argument("--work", type=Path, help="checkpoints, graphs, inputs, references [a new temp folder]")
    ap.add_argument("--bin", default="target/release/perceiver-edge", help="perceiver-edge binary (release)")
    ap.add_argument("--skip-torch-export", action="store_true", help="no transformers' ONNX export column")
    ap.add_argument("--reexport", action="store_true", help="export the perceiver-edge graphs even if cached")
    ap.add_argument("--in-process", action="store_true",
                    help="time perceiver-edge in this process (the Python package, `pip install ./engine/python`) "
                         "alternated with onnxruntime, instead of a `perceiver-edge bench` process a round")
    ap.add_argument("--busy-core", type=int, metavar="N",
                    help="run a busy loop pinned to CPU N beside the timed runs (Linux): a busy neighbour")
    ap.add_argument("--one-session", action="store_true",
                    help="time onnxruntime in a child process per series that makes its own session (untimed), "
                         "so that one session at a time holds memory [always for flow]")
    ap.add_argument("--json", type=Path, help="write all figures to this file")
    a = ap.parse_args()

    threads = checked_args(a, prefix="pe-peer-")
    if threads is None:
        return 1
    say(f"work folder {a.work}; binary {a.bin}; threads {threads}; {os.cpu_count()} CPUs"
        + (f"; a busy loop on CPU {a.busy_core} beside the timed runs" if a.busy_core is not None else ""))
    if a.in_process:
        import perceiver_edge

        say(f"perceiver-edge timed in this process: perceiver_edge {perceiver_edge.__version__} "
            f"from {Path(perceiver_edge.__file__).parent}")

    rows: list[dict] = []
    for name in a.models:
        bench_model(name, a, threads, rows)

    print()
    print("| model | precision | threads | perceiver-edge p50 ms | onnxruntime same graph ms | ratio "
          "| onnxruntime on transformers' export ms | ratio | max abs vs transformers (engine) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['precision']} | {r['threads']} | {fmt(r['engine_ms'])} | {fmt(r['ort_same_ms'])} "
              f"| {fmt(r['ratio_same'], '.3f')} | {fmt(r['ort_torch_ms'])} | {fmt(r['ratio_torch'], '.3f')} "
              f"| {fmt(r['max_abs_engine'], '.3g')} |")
    print()
    for r in rows:
        print(f"per-round ratios {r['model']} {r['precision']} T={r['threads']}: same graph "
              f"{spread(r['rounds'], 'ratio_same')}, transformers' export {spread(r['rounds'], 'ratio_torch')}")
    scale = scaling(rows)
    if scale:
        print()
    for s in scale:
        print(f"thread scaling {s['model']} {s['precision']} (p50 at {s['base_threads']} / p50 at {s['threads']}): "
              f"perceiver-edge {times(s['engine_ms'])}, onnxruntime same graph {times(s['ort_same_ms'])}, "
              f"onnxruntime on transformers' export {times(s['ort_torch_ms'])}")
    if a.json:
        a.json.write_text(json.dumps(dict(bin=a.bin, work=str(a.work), cpus=os.cpu_count(), threads=threads,
                                          rounds=a.rounds, in_process=a.in_process, busy_core=a.busy_core, rows=rows, scaling=scale), indent=1))
        say(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
