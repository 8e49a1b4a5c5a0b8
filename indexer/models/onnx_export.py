"""What the image and text towers' ONNX exports share: the trace, the atomic save, the manifest write.

A tower is traced once by `torch.onnx.export` and saved as a graph plus one external data file
(`<stem>.onnx`, `<stem>.onnx.data`), which ONNX Runtime maps instead of parsing. The data is
written first and the graph renamed into place last, so a `<stem>.onnx` on disk always names
complete data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def export_graph(module, args: tuple, folder: Path, stem: str, input_names: list[str], dynamic_axes: dict) -> None:
    """Trace `module` on `args` into `folder/<stem>.onnx` (+ `.onnx.data`); its output is named 'features'."""
    import io
    import warnings

    import onnx
    import torch

    buffer = io.BytesIO()
    # traced with grad enabled: under no_grad torch may pick fused attention kernels ONNX has no op for
    with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), args, buffer,
            input_names=input_names, output_names=["features"], dynamic_axes=dynamic_axes,
            opset_version=18, dynamo=False,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    del buffer
    tmp = folder / f".{stem}.{os.getpid()}.tmp.onnx"
    (folder / f"{stem}.onnx.data").unlink(missing_ok=True)  # onnx appends to an existing data file
    # the graph names its data file: the data is written first, the graph renamed into place last
    onnx.save_model(graph, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{stem}.onnx.data", size_threshold=1024)
    del graph
    os.replace(tmp, folder / f"{stem}.onnx")


def check_agreement(cosines, bound: float, what: str) -> None:
    """Raise ValueError unless every cosine of the ONNX `what` vectors against torch's reaches `bound`."""
    if not (cosines >= bound).all():
        raise ValueError(f"ONNX {what} vectors differ from torch (min cosine {cosines.min():.6f} < {bound})")


def failure_reason(exc: BaseException) -> str:
    """The one line a manifest keeps of why an export failed."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def write_json(path: Path, data: dict) -> None:
    """Write a manifest atomically: readers see the old one or the new one, never part of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
