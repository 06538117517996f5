"""The device decides, in one place: precision and per-device speed choices resolved once from the hardware present.

``precision: auto`` (the default of ``ftframe fit`` and of every shipped config) resolves to

* ``bf16-mixed`` on a CUDA GPU with bfloat16 support, ``16-mixed`` on an older CUDA GPU;
* ``bf16-mixed`` on a CPU whose bfloat16 matmuls are measured faster than float32 ones (AVX512-BF16 / AMX);
* ``32-true`` on every other CPU -- on an AVX2-only CPU a bfloat16 matmul runs about 50x slower than float32.

The CPU is not judged by its flags alone: a probe of well under a second times one float32 and one bfloat16 matmul
(capability flags can be masked -- see :data:`CPU_SIMULATION_VARIABLES` -- and then only the timing tells the
truth). ``FTFRAME_CPU_BF16=fast`` or ``slow`` declares the answer instead of probing (the same choice on every node
of a mixed cluster; the test suite pins ``slow`` so that it runs alike on every machine kind). The
resolution is printed once, recorded in every trained folder's ``ftframe.json`` (``device``),
and read by training (frozen-weight dtype, QLoRA's compute dtype), ``ftframe evaluate`` / ``generate`` (``dtype:
auto``), the forgetting monitor (it runs inside the Trainer's precision) and the benchmarks. An explicit precision or
dtype wins, with a warning naming the measured factor when it is the slow one here.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer as LightningTrainer

__all__ = ["CPU_BF16_ENV", "CPU_SIMULATION_VARIABLES", "DevicePlan", "Trainer", "cpu_16bit_speed", "cpu_matmul_speed", "inference_dtype", "is_rank_zero", "plan_for", "simulated_cpu",
           "resolve_precision"]

#: What ``precision`` accepts in ftframe: Lightning's values plus ``auto``.
PrecisionName = Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                        "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64"]

#: A CPU counts as having fast bfloat16 when its bfloat16 matmuls run at least this many times as fast as float32
#: ones (native bf16 CPUs measure ~2.5x; AVX2-only ones ~0.02x; bf16 emulated on AVX-512 without BF16, ~0.3-0.6x).
FAST_16BIT_RATIO = 1.25

#: Environment variable that declares the CPU's bfloat16 speed (``fast`` / ``slow``) instead of probing it.
CPU_BF16_ENV = "FTFRAME_CPU_BF16"


@dataclass(frozen=True)
class DevicePlan:
    """What ftframe chose for the device at hand, and why (recorded in ``ftframe.json`` as ``device``)."""

    #: ``cuda`` or ``cpu``
    device: str
    #: the processor: GPU name, or the CPU's model and PyTorch's CPU capability (``AVX2``, ``AVX512``, ...)
    name: str
    #: the training precision the run uses
    precision: str
    #: the precision that was asked for (``auto``, or the user's explicit choice)
    requested: str
    #: the dtype ``ftframe evaluate`` / ``generate`` load models in for ``dtype: auto``
    inference_dtype: str
    #: one sentence: why this precision
    reason: str
    #: CPU only: measured bfloat16 / float32 and float16 / float32 matmul throughput ratios (``None`` if not probed)
    bf16_speed: float | None = None
    fp16_speed: float | None = None
    #: a warning for an explicit choice that is slow here, else ``None``
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def summary(self) -> str:
        return f"[ftframe] device: {self.name}; precision {self.precision} ({self.reason})"


# ------------------------------------------------------------------------------------------------------ the probe
#: what makes a newer x86 CPU act as an AVX2-only one, all three needed: ``MKL_ENABLE_INSTRUCTIONS=AVX2`` (float32
#: matmuls go through MKL, which picks its own instruction set), ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's own
#: kernels) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, bfloat16 matmuls)
CPU_SIMULATION_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def simulated_cpu() -> str:
    """The :data:`CPU_SIMULATION_VARIABLES` set in this process, as ``NAME=value`` words ('' when none)."""
    return " ".join(f"{k}={os.environ[k]}" for k in CPU_SIMULATION_VARIABLES if k in os.environ)


def _best_seconds(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    a @ b  # first call: kernel selection / packing
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


@functools.cache
def cpu_matmul_speed(dtype: torch.dtype = torch.bfloat16) -> float:
    """Throughput of a ``dtype`` matmul relative to float32 on this CPU (> 1: faster), measured in well under a second.

    A 256 x 256 product first (a slow kernel shows itself there: ~25 ms on an AVX2-only CPU, where float32 takes
    under 1 ms); only if that is not clearly slow, 512 x 512 products decide (small sizes understate fast kernels).
    Cached for the process: every caller sees the same answer.
    """
    g = torch.Generator().manual_seed(0)
    small = [torch.randn(256, 256, generator=g) for _ in range(2)]
    fp32 = _best_seconds(*small, reps=3)
    low = _best_seconds(*(t.to(dtype) for t in small), reps=1)
    ratio = fp32 / low
    if ratio < 0.25:
        return ratio
    big = [torch.randn(512, 512, generator=g) for _ in range(2)]
    return _best_seconds(*big, reps=3) / _best_seconds(*(t.to(dtype) for t in big), reps=3)


def _cpu_name() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return f"CPU {model or 'unknown'} ({torch.backends.cpu.get_cpu_capability()}, {cores} cores)".replace("  ", " ")


# -------------------------------------------------------------------------------------------------- the resolution
def _device_kind(accelerator: Any) -> str:
    """``cuda`` or ``cpu`` for a Trainer ``accelerator`` value (``auto`` / ``None``: CUDA when a GPU is visible)."""
    if accelerator is None:
        name = "auto"
    elif isinstance(accelerator, str):
        name = accelerator.lower()
    else:  # an Accelerator instance
        name = type(accelerator).__name__.lower()
    if name in ("gpu", "cuda") or "cuda" in name:
        return "cuda"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def _normalise(precision: Any) -> str:
    aliases = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
    text = str(precision) if precision is not None else "32-true"
    return aliases.get(text, text)


def plan_for(requested: Any = "auto", accelerator: Any = "auto") -> DevicePlan:
    """Resolve ``requested`` (``auto`` or an explicit precision) for the device ``accelerator`` names.

    Pure apart from the probes (:func:`cpu_16bit_speed`, ``torch.cuda``), which tests fake.
    """
    req = "auto" if requested in (None, "auto") else _normalise(requested)
    if _device_kind(accelerator) == "cuda" and torch.cuda.is_available():
        name = f"CUDA {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
        bf16 = torch.cuda.is_bf16_supported()
        auto, reason = (("bf16-mixed", "CUDA GPU with bfloat16 support") if bf16 else
                        ("16-mixed", "CUDA GPU without bfloat16 support: float16 with loss scaling"))
        warning = None
        if req == "32-true":
            warning = (f"precision 32-true on {name}: float32 matmuls run several times slower than {auto} on a "
                       f"GPU and need twice the activation memory; precision: auto would pick {auto}")
        return DevicePlan("cuda", name, auto if req == "auto" else req, req,
                          "bfloat16" if bf16 else "float16", reason if req == "auto" else "asked for explicitly",
                          warning=warning)
    name = _cpu_name()
    bf16, how = cpu_16bit_speed(torch.bfloat16)
    fast = bf16 >= FAST_16BIT_RATIO
    if how != "measured":
        reason = f"{how}: bfloat16 {'fast' if fast else 'slow'} on this CPU"
    elif fast:
        reason = f"bfloat16 matmuls measured {bf16:.1f}x as fast as float32 on this CPU"
    else:
        reason = f"bfloat16 matmuls measured {_times(1 / bf16)} slower than float32 on this CPU (no native bf16)"
    auto = "bf16-mixed" if fast else "32-true"
    fp16 = None
    warning = None
    if req in ("bf16-mixed", "bf16-true") and not fast:
        warning = (f"precision {req} on a CPU without fast bfloat16: bfloat16 matmuls {_factor(bf16, how)} than "
                   f"float32 here ({name}); training will be that much slower. precision: auto picks 32-true")
    elif req in ("16-mixed", "16-true"):
        fp16, how16 = cpu_16bit_speed(torch.float16)
        if fp16 < FAST_16BIT_RATIO:
            warning = (f"precision {req} on this CPU: float16 matmuls {_factor(fp16, how16)} than float32 here "
                       f"({name}). precision: auto picks {auto}")
    elif req == "32-true" and fast:
        speed = f"bfloat16 matmuls measured {bf16:.1f}x as fast as float32" if how == "measured" else how
        warning = (f"precision 32-true on a CPU with fast bfloat16 ({speed}; {name}): training is slower and needs more "
                   "memory than it has to. precision: auto picks bf16-mixed")
    return DevicePlan("cpu", name, auto if req == "auto" else req, req, "float32",
                      reason if req == "auto" else "asked for explicitly",
                      bf16_speed=round(bf16, 4) if how == "measured" else None,
                      fp16_speed=None if fp16 is None else round(fp16, 4), warning=warning)


def cpu_16bit_speed(dtype: torch.dtype) -> tuple[float, str]:
    """``(speed of dtype matmuls relative to float32, how it is known)``: ``measured`` by :func:`cpu_matmul_speed`,
    or declared by ``FTFRAME_CPU_BF16`` (which speaks for float16 too: CPUs with fast bf16 kernels have fast fp16)."""
    declared = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if declared in ("fast", "slow"):
        return (2.0 if declared == "fast" else 0.02), f"{CPU_BF16_ENV}={declared}"
    if declared:
        from ftframe.errors import UserError

        raise UserError(f"{CPU_BF16_ENV}={declared!r}: expected fast, slow, or unset to measure the CPU")
    return cpu_matmul_speed(dtype), "measured"


def _factor(speed: float, how: str) -> str:
    return f"measured {_times(1 / speed)} slower" if how == "measured" else f"slower ({how})"


def _times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def resolve_precision(requested: Any = "auto", accelerator: Any = "auto", *, announce: bool = True) -> DevicePlan:
    """:func:`plan_for`, printed on rank 0 with the warning for a slow explicit choice."""
    plan = plan_for(requested, accelerator)
    if announce and is_rank_zero():
        print(plan.summary(), flush=True)
        if plan.warning:
            warnings.warn(f"[ftframe] {plan.warning}", UserWarning, stacklevel=2)
    return plan


def inference_dtype(requested: str = "auto", device: str = "cpu") -> str:
    """The dtype evaluation and generation load a model in: ``auto`` resolves per device; warns on a slow choice.

    ``auto``: float32 on a CPU (exact scores; what lm-evaluation-harness agreement is checked in), bfloat16 on a
    CUDA GPU that supports it, float16 on an older one.
    """
    if device == "cuda" and torch.cuda.is_available():
        auto = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return auto if requested == "auto" else requested
    if requested in ("bfloat16", "float16"):
        speed, how = cpu_16bit_speed(torch.bfloat16 if requested == "bfloat16" else torch.float16)
        if speed < FAST_16BIT_RATIO:
            warnings.warn(f"[ftframe] dtype {requested} on this CPU: {requested} matmuls {_factor(speed, how)} than "
                          f"float32 here ({_cpu_name()}); dtype: auto uses float32", UserWarning, stacklevel=2)
        return requested
    return "float32"


def is_rank_zero() -> bool:
    """Whether this is the run's first process, from the launchers' variables (before Lightning's strategy is set up):
    torchrun's global ``RANK``; SLURM's ``SLURM_PROCID`` for a job of several tasks; else Lightning's own launcher's
    ``LOCAL_RANK`` and ``NODE_RANK`` (``GROUP_RANK``: torchrun's node rank)."""
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"]) == 0
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"]) == 0
    return all(int(env.get(name) or 0) == 0 for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


# ------------------------------------------------------------------------------------------------------ the Trainer
class Trainer(LightningTrainer):
    """Lightning's ``Trainer`` whose ``precision`` defaults to ``auto``: resolved from the device (see this module).

    The resolved :class:`DevicePlan` is :attr:`device_plan`; ``ftframe.json`` records it. Every other argument is
    Lightning's own.

    Args:
        precision: ``auto`` (bf16-mixed on CUDA with bfloat16 and on CPUs with fast bfloat16 matmuls, 16-mixed on
            other CUDA GPUs, 32-true on other CPUs), or any Lightning precision (it wins; a warning names the
            measured factor when it is the slow one on this device).
    """

    def __init__(self, *args: Any, precision: PrecisionName | int | None = "auto", **kwargs: Any) -> None:
        plan = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        super().__init__(*args, precision=plan.precision, **kwargs)  # type: ignore[arg-type]
        self.device_plan = plan
