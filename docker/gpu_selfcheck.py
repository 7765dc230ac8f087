"""The GPU image's self-check: the CUDA libraries that torch and onnxruntime-gpu need are there and load.

    python /opt/ice/gpu_selfcheck.py            # at build time (no GPU, no driver): run by docker/Dockerfile.gpu
    python /opt/ice/gpu_selfcheck.py --device   # on a GPU node: kernels run, and ONNX runs on CUDA, not on CPU

The image carries no CUDA toolkit of its own: the CUDA runtime, cuBLAS, cuDNN, cuFFT, ... come as the `nvidia-*`
wheels that torch and onnxruntime-gpu were built against (one CUDA major version for both; the build checks it),
registered with the dynamic loader (/etc/ld.so.conf.d). Only the driver (libcuda.so.1) comes from the node, put
in the container by the NVIDIA container toolkit: it must be at least the one that CUDA major version needs
(docs/deployment.md lists the minimum per cloud).

Without `--device`, "compiled in" is not taken for "works": onnxruntime lists CUDAExecutionProvider even when the
provider library cannot be loaded (it then falls back to the CPU, silently), so every CUDA library of torch and of
the provider is resolved by the dynamic loader here, and each CUDA library is opened.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.metadata as metadata
import os
import re
import subprocess
import sys

DRIVER_LIBRARIES = {"libcuda.so.1", "libnvidia-ml.so.1"}  # from the node's driver, at run time


def missing_libraries(ldd_output: str) -> list[str]:
    """Libraries `ldd` could not resolve, less the driver's (which only a GPU node provides)."""
    missing = []
    for line in ldd_output.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+not found", line)
        if m and m.group(1) not in DRIVER_LIBRARIES:
            missing.append(m.group(1))
    return missing


def cuda_major(version: str | None) -> int | None:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


def check_build() -> list[str]:
    problems = []
    names = {d.metadata["Name"].lower() for d in metadata.distributions()}
    if "onnxruntime" in names:
        problems.append("onnxruntime (CPU) is installed beside onnxruntime-gpu: they provide the same module")
    if "onnxruntime-gpu" not in names:
        problems.append("onnxruntime-gpu is not installed")
        return problems
    import onnxruntime
    import torch
    from onnxruntime.capi import build_and_package_info as ort_build

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        problems.append(f"onnxruntime has no CUDA provider: {onnxruntime.get_available_providers()}")
    torch_cuda, ort_cuda = torch.version.cuda, getattr(ort_build, "cuda_version", None)
    if cuda_major(torch_cuda) is None or cuda_major(torch_cuda) != cuda_major(ort_cuda):
        problems.append(f"torch is built for CUDA {torch_cuda}, onnxruntime-gpu for CUDA {ort_cuda}: one major "
                        "version is needed for both")
    libraries = [
        *glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cuda.so")),
        *glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime_providers_cuda.so")),
    ]
    if len(libraries) != 2:
        problems.append(f"torch's or onnxruntime's CUDA library is missing: found {libraries}")
    for lib in libraries:
        out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
        for name in missing_libraries(out):
            problems.append(f"{os.path.basename(lib)} needs {name}, which the dynamic loader cannot find")
    major = cuda_major(torch_cuda)
    for name in (f"libcudart.so.{major}", f"libcublas.so.{major}", "libcudnn.so.9"):
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            problems.append(f"cannot load {name}: {exc}")
    return problems


def check_device() -> list[str]:
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    from onnx import TensorProto, helper

    problems = []
    if not torch.cuda.is_available():
        return [f"torch sees no GPU (CUDA {torch.version.cuda}; is the node's driver new enough?)"]
    x = torch.randn(256, 256, device="cuda")
    if not torch.isfinite(x @ x).all().item():
        problems.append("a matrix product on the GPU gave non-finite values")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "selfcheck",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 2]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":  # onnxruntime falls back to the CPU silently
        problems.append(f"onnxruntime runs on {session.get_providers()}, not on CUDA")
    a = np.eye(2, dtype=np.float32)
    if not np.allclose(session.run(None, {"a": a, "b": a})[0], a):
        problems.append("onnxruntime on CUDA computed a wrong product")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", action="store_true", help="run on the GPU (a GPU node; not at build time)")
    a = parser.parse_args(argv)
    problems = check_device() if a.device else check_build()
    for p in problems:
        print(f"gpu self-check: {p}", file=sys.stderr)
    if not problems:
        print(f"gpu self-check: ok ({'device' if a.device else 'libraries'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
