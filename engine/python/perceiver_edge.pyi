"""perceiver-edge from Python: export PerceiverIO checkpoints to fixed-shape ONNX and run them
with the tract-based engine (numpy arrays in and out).

Errors are Python exceptions with one-line messages naming the file or tensor at fault:
``ValueError`` (bad input, file content or option), ``TypeError`` (an input that is not a
numpy array), ``FileNotFoundError`` (a missing path), ``OSError`` (a failed read or write),
``RuntimeError`` (inference failed, or an internal error).
"""

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = ["Model", "TensorSpec", "export", "inspect", "compare", "set_threads", "__version__"]

_StrPath = Union[str, "os.PathLike[str]"]

@final
class TensorSpec:
    """Name, numpy dtype name and fixed shape of a model input or output."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """numpy dtype name: ``"float32"``, ``"int64"``, ..."""
    @property
    def shape(self) -> Tuple[int, ...]: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class Model:
    """An exported ONNX model, loaded and optimised once (tract); run it many times."""

    @classmethod
    def load(cls, path: _StrPath, device: str = "cpu") -> "Model":
        """Loads an ``.onnx`` file. ``device``: ``"cpu"``, or ``"cuda"`` in a build with the
        runtime's ``cuda`` feature."""
    @property
    def inputs(self) -> List[TensorSpec]:
        """Graph inputs, in graph order."""
    @property
    def outputs(self) -> List[TensorSpec]:
        """Graph outputs, in graph order (the order of ``run``'s result)."""
    @property
    def path(self) -> str: ...
    @property
    def precision(self) -> str:
        """``"f32"``, ``"f16"``, ``"int8"``, ``"int8-static"`` or ``"q4"``."""
    @property
    def summary(self) -> Optional[Dict[str, Any]]:
        """The exporter's summary stored in the file (what ``inspect`` reports), or None."""
    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Dict[str, npt.NDArray[Any]]:
        """``{input name: array}`` -> ``{output name: array}``.

        Every input is required, with exactly the model's dtype and shape (``ValueError``
        naming the input otherwise; integer inputs are also checked against their value
        range). Inputs are copied once; outputs are numpy arrays over the engine's output
        buffers (no copy). The GIL is released while the model runs.
        """
    def warm_up(self, inputs: Mapping[str, npt.NDArray[Any]], runs: int = 5) -> int:
        """Runs the model ``runs`` times on ``inputs`` (outputs dropped) and, at more than one
        thread (``set_threads``), on until the engine has chosen between its thread pool and one
        thread for this model (at most 12 more runs). Returns the runs made."""
    def pool_use(self) -> Dict[str, Any]:
        """Where this model's runs went at more than one thread (``set_threads``), from its load:
        ``{"pool_runs", "one_thread_runs", "pool_share"}``. The engine runs on one thread where
        that is faster (a small model, or the pool's cores busy with another process);
        ``pool_share`` is the share of their cores the pool's threads had (None without pool
        runs)."""
    def bench(
        self,
        runs: int = 100,
        warmup: int = 5,
        threads: int = 1,
        *,
        duration: Optional[float] = None,
        rate: Optional[float] = None,
        inputs: Optional[Mapping[str, npt.NDArray[Any]]] = None,
    ) -> Dict[str, Any]:
        """``perceiver-edge bench --json`` as a dict: ``model, precision, file_bytes,
        resident_weight_bytes, load_ms, warmup, runs, threads, pool_runs, pool_share,
        latency_ms{min, mean, p50, p90,
        p99, max, stddev}, throughput_per_s, memory{peak_rss, rss_after_warmup, rss_end,
        peak_heap, heap_after_warmup, heap_end}, paced`` (times in ms, memory in bytes; ``paced``
        is None unless ``rate`` is given). The model file is loaded again (``load_ms``);
        synthetic inputs unless ``inputs`` is given."""

def export(
    checkpoint: _StrPath,
    output: _StrPath,
    precision: str = "f32",
    *,
    batch: Optional[int] = None,
    image_size: Optional[Tuple[int, int]] = None,
    seq_len: Optional[int] = None,
    attention_mask: bool = False,
    decode_subset: Optional[int] = None,
    image_points: Optional[int] = None,
    audio_points: Optional[int] = None,
    decoder: Optional[_StrPath] = None,
    no_rewrites: bool = False,
    no_position_tables: bool = False,
    latents: Optional[int] = None,
    blocks: Optional[int] = None,
    calibrate: Optional[_StrPath] = None,
    calibration_method: str = "minmax",
    keep_f32: Optional[Sequence[str]] = None,
    tables: Optional[str] = None,
    external_data: bool = False,
    reduce_range: bool = False,
) -> Dict[str, Any]:
    """``perceiver-edge export CHECKPOINT -o OUTPUT``: writes one fixed-shape ONNX file
    (atomically). Options are the CLI's (``--image-size H W`` is ``image_size=(H, W)``,
    ``--keep-f32 P`` is ``keep_f32=[P, ...]``, ``--tables auto|all|none`` is ``tables="..."``,
    ``no_position_tables=True`` is ``tables="none"``, ``--external-data`` is
    ``external_data=True``: the weights go to ``OUTPUT.data``, as they do automatically past
    2 GiB; ``--reduce-range`` is ``reduce_range=True``). Returns the summary: ``architecture, dims, depth, heads, batch, parameters, flops,
    weight_bytes, largest_activation, inputs, outputs, tables, rewrites`` plus ``path``,
    ``file_bytes``, ``precision``, ``table_decisions`` (``(pass, kept, bytes, replaces,
    flops_saved, reason)`` per table rewrite), with external data ``external_data`` and
    ``external_data_bytes``, and, with ``latents``, ``latents_kept``."""

def inspect(
    path: _StrPath,
    *,
    batch: Optional[int] = None,
    image_size: Optional[Tuple[int, int]] = None,
    seq_len: Optional[int] = None,
    attention_mask: bool = False,
    decode_subset: Optional[int] = None,
    image_points: Optional[int] = None,
    audio_points: Optional[int] = None,
    decoder: Optional[_StrPath] = None,
    no_rewrites: bool = False,
    no_position_tables: bool = False,
    tables: Optional[str] = None,
) -> Dict[str, Any]:
    """``perceiver-edge inspect``: for a checkpoint folder, the summary of the graph it would
    export (shape options as in ``export``); for an ``.onnx`` file, the stored summary plus
    ``file_bytes``, ``precision``, ``resident_weights`` (bytes by storage kind after tract's
    optimisation), ``resident_weight_bytes`` and ``summary_stored``. Both carry ``path``."""

def compare(
    reference: _StrPath,
    candidate: _StrPath,
    inputs: _StrPath,
    labels: Optional[_StrPath] = None,
    *,
    layers: bool = True,
) -> Dict[str, Any]:
    """``perceiver-edge compare --json``: runs both graphs on ``inputs`` (a ``.npy`` stack along
    axis 0, or a folder of ``.npy`` files) and returns ``samples``, ``outputs`` (``[{name,
    stats{max_abs, mean_abs, cosine, rel_max, rel_l2}}]``), ``top1_agreement``, ``accuracy``
    (``{reference, candidate}`` with ``labels``, else None) and ``layers`` (the per-layer
    table; empty with ``layers=False``)."""

def set_threads(n: int) -> None:
    """Threads for tract's matrix products in this process (1 = single-threaded, the
    default)."""
