"""What machine a measurement came from: recorded next to every timing and every trained figure.

Timings on a shared 2-core machine vary by 2x from one day's machine to the next, and the figures a tiny
model learns vary with the CPU's vector ISA: torch picks its kernels by ``cpu_capability`` (AVX2 or
AVX-512), their float sums round differently, and a few hundred optimizer steps turn that into a
different model (the same seed and commit gave base accuracy 0.470 on earlier machines, presumably
AVX-512, and 0.430 on an AVX2-only one).
Two runs are comparable only when this record matches.
"""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_info(threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """The CPU (model, logical and usable cores, torch's kernel ISA), the GPU when ``device`` is CUDA,
    the torch threads a measurement used (when given) and library versions."""
    import torch
    import transformers

    info = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # The ISA of the kernels torch dispatches to (e.g. AVX2, AVX512): it decides float rounding.
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if threads is not None:
        info["torch_threads"] = threads
    return info
