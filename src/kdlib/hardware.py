"""What the machine runs natively: the facts ``auto`` settings are resolved from.

bfloat16 is only fast where the hardware has bf16 arithmetic: CUDA devices with bf16 support, and
CPUs with AVX-512-BF16 or AMX whose oneDNN kernels are enabled. On an AVX2-only CPU a bf16 matrix
product is emulated and several times slower than float32 (docs/hardware.md), so ``dtype: auto`` picks
float32 there. ``ONEDNN_MAX_CPU_ISA`` lowered below AVX-512 counts as "not native" too, since
oneDNN then refuses its bf16 kernels (this is how an AVX2-only machine is emulated for measuring).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 compute is native on a device, and why (for the log and the resolved config)."""

    native: bool
    reason: str


def resolve_device_type(spec: str) -> str:
    """'cuda' or 'cpu' for a device spec (``auto``: cuda when available)."""
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if spec.startswith("cuda") else spec


@functools.lru_cache(maxsize=None)
def bf16_support(device_type: str) -> Bf16Support:
    """Native bf16 on ``device_type`` ("cpu" or "cuda")."""
    import torch

    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Bf16Support(True, f"CUDA device {torch.cuda.get_device_name()} supports bf16")
        return Bf16Support(False, "CUDA device without bf16 support")
    if device_type != "cpu":
        return Bf16Support(False, f"{device_type}: bf16 not known to be native")
    flags = cpu_bf16_flags()
    if not flags:
        return Bf16Support(False, f"CPU without AVX-512-BF16 or AMX ({cpu_capability()}): bf16 is emulated, float32 is faster")
    if not _onednn_bf16_enabled():
        return Bf16Support(False, f"CPU has {'+'.join(flags)} but oneDNN bf16 kernels are disabled (ONEDNN_MAX_CPU_ISA)")
    return Bf16Support(True, f"CPU with {'+'.join(flags)}")


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 features among AVX512_BF16 and AMX."""
    import torch

    found = []
    probes = {"AVX512_BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    cpuinfo = None
    for name, probe in probes.items():
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            present = bool(fn())
        else:  # older torch: read the kernel's flags
            cpuinfo = cpuinfo if cpuinfo is not None else _proc_cpu_flags()
            present = {"AVX512_BF16": "avx512_bf16", "AMX": "amx_bf16"}[name] in cpuinfo
        if present:
            found.append(name)
    return found


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _onednn_bf16_enabled() -> bool:
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


def _proc_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()
