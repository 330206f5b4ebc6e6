"""Optional C kernels for the CPU hot paths, compiled once with the system C compiler.

Pure eager torch cannot fuse "read a float, emit one bit" or "read a bit, add
+-c": every elementwise op writes a full-size temporary, and on the CPU a fresh
64 MB temporary costs more in page faults than the arithmetic.  ``torch.compile``
was measured here first (2 cores, torch 2.13): inductor packs signs well but
drops to scalar code as soon as the zero/NaN test is fused in (10-24 ms for
16 M entries, against 1.7 ms for one read), and its first compile takes 7-28 s
per kernel and dtype.  These kernels are plain C11 + OpenMP, about 1 s to
build, cached under ``$COMMLMO_KERNEL_CACHE`` (default ``~/.cache/commlmo``)
keyed by the source hash and the CPU, and loaded with :mod:`ctypes`.

Nothing calls a kernel directly: each is the CPU implementation of a
``torch.library`` custom op (``torch.ops.commlmo.*``, defined next to its eager
twin in the calling module), so dispatch, FakeTensor and ``torch.compile`` see
an operator with a shape function, never a ``data_ptr()``.  Every kernel has an
eager torch twin that gives the same bits (the same values up to float
rounding, for PowerSGD's matrix products); the kernels run only on plain
contiguous CPU tensors (:func:`available`), and :func:`kernels` returns
``None`` (with one warning) when no compiler is available.
``COMMLMO_NATIVE_KERNELS=0`` disables them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode, is_traceable_wrapper_subclass

from ._csrc import SOURCE

__all__ = ["available", "call", "dispatches_itself", "kernels", "num_threads", "readable"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_I64, _U32, _U16, _F32, _PTR, _INT = (
    ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint16, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
)
_SIGNATURES = {
    "pack_signs_f32": (_I64, [_PTR, _I64, _PTR, _INT, _U32, _U32, _PTR, _INT]),
    "pack_signs_16": (_I64, [_PTR, _I64, _PTR, _U16, _INT, _U32, _U32, _PTR, _INT]),
    "add_signs_f32": (None, [_PTR, _PTR, _I64, _F32, _INT]),
    "natural_f32": (_I64, [_PTR, _I64, _U32, _U32, _U32, _PTR, _PTR, _INT]),
    "abs_sum_f32": (ctypes.c_double, [_PTR, _I64, _INT]),
    "natural_decode_f32": (None, [_PTR, _PTR, _I64, _PTR, _INT]),
    "topk_abs_f32": (_I64, [_PTR, _I64, _F32, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _INT]),
    "xq_f32": (None, [_PTR, _I64, _I64, _PTR, _INT, _PTR, _INT]),
    "xtp_f32": (None, [_PTR, _I64, _I64, _PTR, _INT, _PTR, _INT]),
    "xq_xtp_f32": (None, [_PTR, _I64, _I64, _PTR, _INT, _PTR, _PTR, _INT]),
    "vote_words_i64": (None, [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _INT]),
}


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return "|".join([platform.machine(), platform.system(), *lines])


def _cache_dir() -> Path:
    root = os.environ.get("COMMLMO_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "commlmo"
    )
    return Path(root)


def _build(cc: str) -> Path:
    src = SOURCE
    flag_sets = [
        ["-O3", "-march=native", "-fopenmp"],
        ["-O3", "-fopenmp"],
        ["-O3"],
    ]
    key = hashlib.sha256((src + _cpu_tag() + cc).encode()).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "commlmo"):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        target = directory / f"kernels_{key}.so"
        if target.exists():
            return target
        errors = []
        for flags in flag_sets:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            c_file = tmp[:-3] + ".c"
            Path(c_file).write_text(src)
            cmd = [cc, *flags, "-std=gnu11", "-shared", "-fPIC", c_file, "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            os.unlink(c_file)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
                return target
            os.unlink(tmp)
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[:500]}")
        raise RuntimeError("; ".join(errors))
    raise RuntimeError(f"no writable cache directory (tried {_cache_dir()} and the temp dir)")


def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` when unavailable."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("COMMLMO_NATIVE_KERNELS", "1") == "0" or sys.byteorder != "little":
            return None
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
        if cc is None:
            warnings.warn("commlmo: no C compiler found; compressors use eager torch kernels (slower)",
                          RuntimeWarning, stacklevel=3)
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except Exception as exc:  # noqa: BLE001 -- a broken toolchain must never break training
            warnings.warn(f"commlmo: could not build the C kernels ({exc}); using eager torch kernels",
                          RuntimeWarning, stacklevel=3)
            return None
        _lib = lib
        return lib


def _plain(t: torch.Tensor) -> bool:
    """A plain, dense, contiguous CPU tensor with real storage: what a ``data_ptr()`` kernel may read.

    Tensor subclasses (DTensor, FSDP2's sharded parameters, fake and meta tensors,
    functorch wrappers) report a ``data_ptr`` that is not their data; they take the
    eager torch path, which dispatch handles.
    """
    return (
        type(t) is torch.Tensor
        and t.layout == torch.strided
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.is_meta
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def available(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels if every tensor is a plain contiguous CPU tensor (see :func:`_plain`), else ``None``."""
    if not all(_plain(t) for t in tensors):
        return None
    return kernels()


#: where the kernels' outputs are allocated, named explicitly: under ``with torch.device(...)`` a bare
#: ``torch.empty`` would land on that device and the kernel would write through a foreign pointer
CPU = torch.device("cpu")

_PARALLEL_MIN_NUMEL = 1 << 16  # below this, waking a thread costs more than it saves


def num_threads(numel: int) -> int:
    """Threads for a kernel over ``numel`` entries: torch's intra-op count, or 1 for small inputs."""
    return max(1, torch.get_num_threads()) if numel >= _PARALLEL_MIN_NUMEL else 1


def dispatches_itself(t: torch.Tensor) -> bool:
    """A wrapper subclass (DTensor, FSDP2's sharded parameters) that runs every aten op itself.

    The ``commlmo::`` custom ops have no sharding rules, so such tensors take the
    eager torch twins, whose aten ops the subclass knows how to run.
    """
    return is_traceable_wrapper_subclass(t)


def call(op: Callable, cpu_kernel: Callable, *args: Any) -> Any:
    """Run the custom op ``op`` (a ``torch.ops.commlmo.*`` overload) whose CPU kernel is ``cpu_kernel``.

    Two cases skip the dispatcher and call ``cpu_kernel`` (which takes any tensor:
    the C kernel where it applies, the eager torch twin otherwise):

    * a wrapper subclass among the tensors (:func:`dispatches_itself`);
    * plain eager CPU tensors, no ``torch.compile`` and no dispatch mode (FakeTensor,
      tracing): the dispatcher would pick ``cpu_kernel`` anyway, after ~30-40 us of
      custom-op dispatch per call -- as long as packing 64 K signs takes.

    Everything else -- compiled code, fake and meta tensors, CUDA -- goes through ``op``.
    """
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(dispatches_itself(t) for t in tensors):
        return cpu_kernel(*args)
    if not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None and all(
        type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors
    ):
        return cpu_kernel(*args)
    return op(*args)


def readable(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values back to the host: not under ``torch.compile`` (a graph
    break) and not for fake or meta tensors, which have shapes but no values."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type != "meta" and not isinstance(t, torch._subclasses.fake_tensor.FakeTensor)
