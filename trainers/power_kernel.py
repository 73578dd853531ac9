"""Build and call the fused AdamPower CPU kernel in adampower_kernel.c.

The C source is compiled once per machine with the system C compiler into a
shared library under ``$XDG_CACHE_HOME/gradpower-study/kernels`` (default
``~/.cache/gradpower-study/kernels``) and loaded with ctypes. The file name
contains a hash of the source, the compiler, its flags and the CPU's model and
feature flags, because ``-march=native`` code may not run on another CPU of a
cluster that shares the home directory. Each process compiles into a temporary
file and renames it into place, so concurrent Ray workers never load a partial
library.

Set GRADPOWER_KERNEL=0 to turn the kernel off. Without a C compiler, or when
the build fails, :func:`load_kernel` logs one warning and returns None, and
AdamPower keeps its other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

KERNEL_ENV_VAR = "GRADPOWER_KERNEL"
SOURCE_PATH = Path(__file__).with_name("adampower_kernel.c")

# -ffast-math must stay off, because the portable kernel rounds with an
# add-and-subtract trick that needs IEEE addition. -fno-math-errno and
# -fno-trapping-math let GCC vectorize sqrtf and the selects without changing
# any result.
COMPILE_FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp",
    "-shared",
    "-fPIC",
)
# Libraries to link after the source. pow, sqrt, frexp and ldexp come from libm.
LINK_FLAGS = ("-lm",)
BUILD_TIMEOUT_SECONDS = 120

# The largest power the kernel takes, MAX_POWER in adampower_kernel.c. Larger
# powers use the other paths.
MAX_POWER = 1024.0

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed = False

_POINTER_ARRAY = ctypes.POINTER(ctypes.c_void_p)


def kernel_enabled() -> bool:
    """Return False when GRADPOWER_KERNEL=0 or an earlier build failed."""
    return not _load_failed and os.environ.get(KERNEL_ENV_VAR, "1") != "0"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradpower-study" / "kernels"


def load_kernel() -> ctypes.CDLL | None:
    """Return the loaded kernel library, building it on first use.

    Returns None when the kernel is turned off or its build failed. A failure
    is logged once as a warning and turns the kernel off for the process.
    """
    global _library, _load_failed
    if not kernel_enabled():
        return None
    if _library is not None:
        return _library
    with _lock:
        if _library is None and not _load_failed:
            try:
                _library = open_library(build_library(default_cache_dir()))
            # AttributeError: the library lacks one of the kernel's functions.
            except (
                OSError,
                subprocess.SubprocessError,
                RuntimeError,
                AttributeError,
            ) as error:
                _load_failed = True
                logger.warning(
                    "Failed to build or load the fused AdamPower kernel from %s: "
                    "%s. AdamPower falls back to the power transform and torch's "
                    "AdamW. Set %s=0 to skip the build.",
                    SOURCE_PATH,
                    error,
                    KERNEL_ENV_VAR,
                )
    return _library


def build_library(
    cache_dir: Path, compiler: str | None = None, extra_flags: Sequence[str] = ()
) -> Path:
    """Compile the kernel into ``cache_dir`` unless it is there, and return its path.

    ``compiler`` defaults to $CC, then gcc, then cc on the PATH. ``extra_flags``
    follow COMPILE_FLAGS, for example ``["-mno-avx512f"]`` to build the portable
    version on an AVX-512 machine.

    Raises:
        RuntimeError: no compiler was found, or it failed.
        OSError: the cache directory or the source could not be read or written.
        subprocess.TimeoutExpired: the build ran past BUILD_TIMEOUT_SECONDS.
    """
    compiler_path = _find_compiler(compiler)
    source = SOURCE_PATH.read_bytes()
    key = hashlib.sha256()
    for part in (source, compiler_path.encode(), _compiler_version(compiler_path)):
        key.update(part)
        key.update(b"\0")
    flags = [*COMPILE_FLAGS, *extra_flags]
    key.update(" ".join([*flags, *LINK_FLAGS]).encode())
    key.update(_cpu_identity().encode())
    library = cache_dir / f"adampower_kernel-{key.hexdigest()[:24]}.so"
    if library.exists():
        return library

    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=cache_dir, prefix=".adampower_kernel-", suffix=".so"
    )
    os.close(handle)
    try:
        command = [
            compiler_path,
            *flags,
            "-o",
            temporary,
            str(SOURCE_PATH),
            *LINK_FLAGS,
        ]
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed with exit status "
                f"{completed.returncode}: {completed.stderr.strip()}"
            )
        os.replace(temporary, library)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    logger.info("built the fused AdamPower kernel at %s", library)
    return library


def _find_compiler(compiler: str | None) -> str:
    candidates = [compiler] if compiler else [os.environ.get("CC"), "gcc", "cc"]
    for candidate in candidates:
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    names = ", ".join(name for name in candidates if name)
    raise RuntimeError(f"C compiler not found on the PATH (tried {names})")


def _compiler_version(compiler_path: str) -> bytes:
    completed = subprocess.run(
        [compiler_path, "--version"],
        capture_output=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    return completed.stdout


def _cpu_identity() -> str:
    """Return the CPU model and feature flags that -march=native depends on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = ("model name", "flags", "Features", "CPU part")
    found: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in fields and name not in found:
            found[name] = value.strip()
    described = [f"{name}: {value}" for name, value in sorted(found.items())]
    return "\n".join([platform.machine(), *described])


def open_library(path: Path) -> ctypes.CDLL:
    """Load a library that :func:`build_library` built and declare its functions."""
    library = ctypes.CDLL(str(path))

    step = library.gradpower_adamw_step
    step.restype = ctypes.c_int
    step.argtypes = [
        ctypes.c_int64,  # tensor_count
        _POINTER_ARRAY,  # params
        _POINTER_ARRAY,  # grads
        _POINTER_ARRAY,  # exp_avgs
        _POINTER_ARRAY,  # exp_avg_sqs
        ctypes.c_int,  # write_powered_grads
        ctypes.POINTER(ctypes.c_int64),  # numels
        ctypes.POINTER(ctypes.c_double),  # steps
        ctypes.c_double,  # lr
        ctypes.c_double,  # beta1
        ctypes.c_double,  # beta2
        ctypes.c_double,  # eps
        ctypes.c_double,  # weight_decay
        ctypes.c_double,  # power
        ctypes.c_int,  # num_threads
    ]

    variant = library.gradpower_kernel_variant
    variant.restype = ctypes.c_char_p
    variant.argtypes = []

    max_power = library.gradpower_max_power
    max_power.restype = ctypes.c_double
    max_power.argtypes = []

    power = library.gradpower_power
    power.restype = ctypes.c_int
    power.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_double,
        ctypes.c_int,
    ]
    return library


def kernel_variant(library: ctypes.CDLL) -> str:
    """Return "avx512" or "portable", the implementation the compiler built."""
    return library.gradpower_kernel_variant().decode()


def kernel_supports(tensor: Tensor) -> bool:
    """Return whether ``tensor`` is a contiguous dense float32 CPU tensor."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
    )


def adamw_step(
    library: ctypes.CDLL,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    power: float,
    write_powered_grads: bool,
) -> None:
    """Take one fused AdamW step on phi_p(grad) for tensors of one param group.

    Every tensor must pass :func:`kernel_supports`, and the four tensors at each
    index must have the same number of elements. ``steps`` are the step counts
    after this step's increment. The caller checks both, because the kernel
    reads raw pointers.

    Raises:
        ValueError: ``power`` is not in (0, MAX_POWER].
        MemoryError: the kernel could not allocate its work table.
    """
    count = len(params)
    if count == 0:
        return
    pointer_array = ctypes.c_void_p * count
    status = library.gradpower_adamw_step(
        count,
        pointer_array(*[tensor.data_ptr() for tensor in params]),
        pointer_array(*[tensor.data_ptr() for tensor in grads]),
        pointer_array(*[tensor.data_ptr() for tensor in exp_avgs]),
        pointer_array(*[tensor.data_ptr() for tensor in exp_avg_sqs]),
        int(write_powered_grads),
        (ctypes.c_int64 * count)(*[tensor.numel() for tensor in params]),
        (ctypes.c_double * count)(*steps),
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        power,
        torch.get_num_threads(),
    )
    _check_status(status, power)


def _check_status(status: int, power: float) -> None:
    if status == -2:
        raise ValueError(
            f"Invalid power value for the fused kernel: {power!r}. Use a number "
            f"in (0, {MAX_POWER}]."
        )
    if status != 0:
        raise MemoryError("the fused AdamPower kernel could not allocate memory")


def power_values(library: ctypes.CDLL, values: Tensor, power: float) -> Tensor:
    """Return sign(values) * |values|**power computed by the kernel's power.

    ``values`` must pass :func:`kernel_supports`.

    Raises:
        TypeError: ``values`` is not a contiguous float32 CPU tensor.
        ValueError: ``power`` is not in (0, MAX_POWER].
    """
    if not kernel_supports(values):
        raise TypeError(
            "the kernel's power takes a contiguous float32 CPU tensor, not "
            f"{values.dtype} on {values.device}"
        )
    result = torch.empty_like(values)
    status = library.gradpower_power(
        values.data_ptr(),
        result.data_ptr(),
        values.numel(),
        power,
        torch.get_num_threads(),
    )
    _check_status(status, power)
    return result
