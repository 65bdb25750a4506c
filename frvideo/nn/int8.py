"""int8 graphs for CPU inference: a backend's network exported to ONNX and statically quantized
with ONNX Runtime, then run by ONNX Runtime.

Why ONNX Runtime and not torch: torch's own int8 path for convolutions on CPU (PT2E with the
x86 inductor quantizer) needs torch.compile and a C++ toolchain at run time, and its eager
quantized convs are older than the oneDNN fp32 ones; ONNX Runtime's QDQ int8 convolutions run
this project's ``lite`` 1.8x faster than torch fp32 on one AVX2 core (RECIPE.md of lite), from
a file built once, with nothing to compile on the user's machine.

What is quantized: convolutions only (per output channel weights, uint8 activations with
min/max ranges from calibration faces); GroupNorm, the swish gates, the additions and the
codebook lookup stay float, so the error stays at the convolutions' rounding. Building needs
``onnx`` and torch's ONNX exporter (``pip install 'frvideo[int8-build]'``); running needs
only ``onnxruntime`` (a dependency of frvideo).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import UsageError

INSTALL_HINT = "pip install onnxruntime (a dependency of frvideo; its wheel is missing here)"


def require():
    """The onnxruntime module, or a UsageError with the install hint."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"--precision int8 needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


class Int8Graph:
    """One quantized ONNX graph on the CPU: ``graph(name=array, ...)`` -> list of output arrays.

    ``threads``: ONNX Runtime's intra-op threads (the run's ``--threads``). Its worker threads
    sleep instead of spinning between calls (like torch's under OMP_WAIT_POLICY=PASSIVE): on a
    machine other jobs keep busy a spinning pool burns cores for nothing."""

    def __init__(self, path: Path | str, threads: int = 1):
        ort = require()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types for missing / truncated / foreign files
            raise UsageError(f"cannot load the int8 graph {self.path}: {str(exc).splitlines()[0]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, inputs)


def build_int8_graph(module: torch.nn.Module, example: Sequence[torch.Tensor], input_names: Sequence[str],
                     output_names: Sequence[str], calibration: Iterable[dict[str, np.ndarray]],
                     out_path: Path | str, keep_float: Sequence[str] = (), opset: int = 17) -> Path:
    """Export ``module`` (float32, eval) with ``example`` inputs, quantize its convolutions with
    ranges seen on ``calibration`` (dicts input name -> array), write ``out_path``.

    The batch dimension (0) of every input and output is left dynamic. ``keep_float``: name
    prefixes of ONNX nodes (torch module paths, e.g. ``/predictor``) to leave unquantized."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calibration)

        def get_next(self):
            return next(self.samples, None)

    out_path = Path(out_path).resolve()
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        # ONNX Runtime's shape inference and calibration leave scratch files in the working folder
        os.chdir(tmp)
        try:
            _export_and_quantize(module, example, input_names, output_names, Reader(), Path(tmp), out_path,
                                 keep_float, opset)
        finally:
            os.chdir(here)
    return out_path


def _export_and_quantize(module, example, input_names, output_names, reader, tmp: Path, out_path: Path,
                         keep_float, opset) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    plain, prepared = tmp / "float.onnx", tmp / "prepared.onnx"
    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    torch.onnx.export(module.eval(), tuple(example), str(plain), opset_version=opset, dynamo=False,
                      input_names=list(input_names), output_names=list(output_names), dynamic_axes=axes)
    # symbolic shape inference does not follow the dynamic batch through the codebook lookup's
    # reshapes; ONNX's own inference is enough for quantization
    quant_pre_process(str(plain), str(prepared), skip_symbolic_shape=True)
    nodes = [n.name for n in onnx.load(str(prepared)).graph.node]
    exclude = [n for n in nodes if any(n.startswith(p) for p in keep_float)]
    quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                    nodes_to_exclude=exclude)
