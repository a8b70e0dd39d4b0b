"""Where the networks run: OpenVINO where it is installed, else PyTorch eager (the reference).

For OpenVINO a PyTorch module is exported in memory (torch's TorchScript-based ONNX exporter,
opset 17) and compiled for the CPU once per set of input shapes, every shape fixed but the
ones named dynamic, so that OpenVINO can fold the graph and pre-pack its convolutions. The
compiled graphs of the most recently used shapes are kept. Nothing is written to disk and
nothing is downloaded: the weights are those of the module.

Precision: by default OpenVINO computes in bfloat16 where the CPU does it natively (AVX512-BF16
or AMX: faster predictions, maps within a few per cent) and in float32
elsewhere; a caller may ask for float32 (the detector's fit does, see ``FIT_PRECISION``), and
``$ANOMALY_PRECISION=f32`` makes float32 the default (PyTorch's twin to ~1e-5).
``$ANOMALY_RUNTIME`` (``openvino`` or ``torch``) chooses the runtime.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
# The in-memory export uses torch's TorchScript-based exporter on purpose (fast, no extra
# dependencies); its deprecation notices are not the user's concern. Set once here, since
# warnings.catch_warnings() is not thread-safe.
warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX export")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")    # constant folding notes
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

RUNTIMES = ("openvino", "torch")
RUNTIME_ENV = "ANOMALY_RUNTIME"
PRECISIONS = ("bf16", "f32")
PRECISION_ENV = "ANOMALY_PRECISION"

_EXPORT_LOCK = threading.Lock()          # the exporter keeps global state while it traces


def default_runtime() -> str:
    """$ANOMALY_RUNTIME if set, else OpenVINO where it is installed, else PyTorch eager."""
    wanted = os.environ.get(RUNTIME_ENV)
    if wanted:
        if wanted not in RUNTIMES:
            raise ValueError(f"${RUNTIME_ENV}={wanted!r}; choose one of {RUNTIMES}")
        return wanted
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "torch"
    return "openvino"


@functools.cache
def _core():
    """OpenVINO's runtime core, created once."""
    import openvino as ov

    return ov.Core()


def default_precision() -> str:
    """The precision OpenVINO computes in: "bf16" where the CPU has native bfloat16 and
    $ANOMALY_PRECISION does not say "f32", else "f32"."""
    wanted = os.environ.get(PRECISION_ENV, "bf16")
    if wanted not in PRECISIONS:
        raise ValueError(f"${PRECISION_ENV}={wanted!r}; choose one of {PRECISIONS}")
    return "bf16" if wanted == "bf16" and native_bf16() else "f32"


@functools.cache
def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (OpenVINO would emulate it, slowly, elsewhere)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class CompiledModule:
    """``module`` compiled by OpenVINO once per set of input shapes (and precision and thread
    count), built on first use; the ``max_shapes`` most recently used are kept. Inputs named in ``dynamic`` ({input index: axes})
    may vary along those axes without a new graph. An export or compilation that fails is
    logged and those shapes are left to the caller (``run`` returns None) from then on."""

    def __init__(self, name: str, module: nn.Module, dynamic: dict[int, Sequence[int]] | None = None,
                 max_shapes: int = 8):
        self.name = name
        self.module = module
        self.dynamic = dynamic or {}
        self.max_shapes = max_shapes
        self.failed_shapes: set[tuple] = set()
        self._compiled: OrderedDict[tuple, object] = OrderedDict()     # shapes -> infer request
        self._lock = threading.Lock()

    def graph_key(self, inputs: Sequence[np.ndarray], precision: str, threads: int) -> tuple:
        """What selects a graph: the precision, the thread count and each input's shape, dynamic
        axes as -1."""
        return (precision, threads, *(tuple(-1 if axis in self.dynamic.get(i, ()) else n
                                            for axis, n in enumerate(x.shape)) for i, x in enumerate(inputs)))

    def run(self, inputs: Sequence[np.ndarray], precision: str | None = None,
            threads: int | None = None) -> list[np.ndarray] | None:
        """float32 C-contiguous arrays -> the module's outputs as new float32 arrays, computed in
        ``precision`` ("f32", or the default ``default_precision()``) on ``threads`` threads
        (default: as many as torch uses; fewer for a lane beside another, see ``compile_module``);
        None for shapes OpenVINO cannot run."""
        key = self._key(inputs, precision, threads)
        with self._lock:                       # one infer request per graph: one call at a time
            request = self._request(key, inputs)
            if request is None:
                return None
            outputs = request.infer(list(inputs), share_inputs=True)
            return [np.array(outputs[i]) for i in range(len(outputs))]

    def start(self, inputs: Sequence[np.ndarray], precision: str | None = None,
              threads: int | None = None) -> Callable[[], list[np.ndarray]] | None:
        """``run`` on OpenVINO's own thread: starts it and returns a function that waits for
        the outputs (call it exactly once; ``inputs`` must live until then), or None for shapes
        OpenVINO cannot run. The graph is built, if need be, on the calling thread: a Python
        thread that ran torch work would keep an OpenMP thread pool of its own, and with more
        pooled threads than cores libgomp stops spinning for the rest of the process (the
        mapping nets' training several times slower)."""
        key = self._key(inputs, precision, threads)
        self._lock.acquire()                   # released by the returned function
        try:
            request = self._request(key, inputs)
            if request is None:
                self._lock.release()
                return None
            request.start_async(list(inputs), share_inputs=True)
        except BaseException:
            self._lock.release()
            raise

        def outputs() -> list[np.ndarray]:
            try:
                request.wait()
                return [np.array(tensor.data) for tensor in request.output_tensors]
            finally:
                self._lock.release()
        return outputs

    def _key(self, inputs: Sequence[np.ndarray], precision: str | None, threads: int | None) -> tuple:
        if precision not in (None, "f32"):
            raise ValueError(f"precision {precision!r}: pass None (the default) or 'f32'")
        return self.graph_key(inputs, precision or default_precision(), threads or torch.get_num_threads())

    def _request(self, key: tuple, inputs: Sequence[np.ndarray]):
        if key in self.failed_shapes:
            return None
        if key not in self._compiled:
            try:
                self._compiled[key] = compile_module(self.module, inputs, self.dynamic, key[0],
                                                     key[1]).create_infer_request()
            except Exception:  # an export or compilation failure must not stop the app
                log.warning("%s: OpenVINO cannot run inputs of shapes %s at %s; running them in PyTorch",
                            self.name, key[2:], key[0], exc_info=True)
                self.failed_shapes.add(key)
                return None
            if len(self._compiled) > self.max_shapes:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return self._compiled[key]


def compile_module(module: nn.Module, inputs: Sequence[np.ndarray], dynamic: dict[int, Sequence[int]],
                   precision: str = "f32", threads: int | None = None):
    """Export ``module`` for inputs shaped like ``inputs`` (``dynamic``: {input index: axes that
    may vary}) to ONNX in memory and compile it for the CPU, computing in ``precision`` ("bf16"
    or "f32") on ``threads`` threads (default: as many as torch uses). A graph on fewer threads
    is a lane that runs beside another: its threads are not pinned to cores, or both lanes'
    would be pinned to the same ones."""
    threads = threads or torch.get_num_threads()
    names = [f"input{i}" for i in range(len(inputs))]
    example = tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs)
    buffer = io.BytesIO()
    with _EXPORT_LOCK:
        torch.onnx.export(module, example, buffer, input_names=names, opset_version=17, dynamo=False,
                          dynamic_axes={names[i]: {a: f"{names[i]}_{a}" for a in axes} for i, axes in dynamic.items()} or None)
    core = _core()
    return core.compile_model(core.read_model(buffer.getvalue()), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": threads >= torch.get_num_threads()})
