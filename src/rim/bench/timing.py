"""Measuring: device synchronisation, warm-up and repeats, peak memory, profiles, FLOP utilisation and the
environment a run measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

# dense bf16 peak FLOP/s by device name (first match), for model FLOP utilisation
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(fn: Callable[[], object], device: torch.device) -> dict:
    """One run of ``fn`` under ``torch.profiler``: its wall time (profiler overhead included), the top-level aten
    operators the host dispatched (compiled code's own kernels are not operators), and on a GPU the kernels the
    profiler saw and their summed time; ``device_busy`` = that time over the wall time. A step whose device is busy
    a small fraction of its time is bound by the host issuing work, not by the device doing it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall_ms = 1e3 * (time.perf_counter() - start)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    device_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    return {"wall_ms": wall_ms, "aten_ops": len(ops), "kernels": len(kernels), "device_ms": device_ms,
            "device_busy": device_ms / wall_ms if device.type == "cuda" else None}


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls, after ``warmup`` untimed ones, each between device synchronisations."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (None on a CPU: not measured there)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def mfu(n_params: int, tokens_per_s: float, device: torch.device) -> float | None:
    """Model FLOP utilisation, 6 N FLOPs per token over the device's dense bf16 peak (None where it is unknown).

    6 N counts the weight gradients too; under LoRA the frozen weights have none, so the work done is nearer 4 N.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    return None if peak is None else 6 * n_params * tokens_per_s / peak


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where and with what the numbers were measured."""
    import peft
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists()
                                                             else []) if line.startswith("model name")]
        name = names[0] if names else platform.processor() or "cpu"
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"device": name, "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": None if status is None else bool(status), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
