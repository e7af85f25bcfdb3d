"""The fused kernels' CUDA source and parameter table; importable without CuPy or a GPU.

The hand-written device code is ``kernels.cu`` next to this module (read with
:mod:`importlib.resources`): one template ``eqs_<kernel>_impl<T>`` per kernel, described at
the top of that file. :data:`KERNELS` lists each kernel's parameters in order; the CuPy
executor's launches, the ``extern "C"`` exports (:func:`export_wrappers`, one per kernel and
dtype: ``eqs_<kernel>_f32`` / ``eqs_<kernel>_f64``) and the tests' NumPy reference and CPU
emulator all follow it. :func:`cuda_source` is the whole module as NVRTC compiles it; it has
``#line`` markers, so compiler messages name ``kernels.cu`` and its real line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

#: largest Anderson ``m`` / Broyden ``memory`` the kernels support (shared-memory sizes;
#: ``EQS_MAX_HIST`` in ``kernels.cu``)
MAX_HISTORY = 32
#: threads per block must be a multiple of 32 and at most this (``32 * EQS_MAX_WARPS``)
MAX_BLOCK = 256

#: numpy dtype name -> (C type, kernel-name suffix)
DTYPES: dict[str, tuple[str, str]] = {"float32": ("float", "f32"), "float64": ("double", "f64")}

#: the device code's file name inside this package
SOURCE_FILE = "kernels.cu"
_PACKAGE = __name__.rpartition(".")[0]


@dataclass(frozen=True)
class Param:
    """One kernel parameter; ``ctype`` uses ``T`` for the floating type."""

    ctype: str
    name: str

    @property
    def is_pointer(self) -> bool:
        return self.ctype.endswith("*")


def parse_params(spec: str) -> tuple[Param, ...]:
    """Parameters from a C parameter list such as ``"const T* z, T* out, long long n"``."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        ctype, name = item.rsplit(" ", 1)
        if name.startswith("*"):
            ctype, name = ctype + "*", name[1:]
        out.append(Param(ctype.strip(), name))
    return tuple(out)


_BOOKKEEPING = "T* best_z, T* best_res, int* active, int* status, int* iterations, int* n_stopped"

#: kernel -> its parameters, in order (the wrappers, CuPy launches, the emulator's ctypes
#: signatures and the NumPy references all follow this table)
KERNELS: dict[str, tuple[Param, ...]] = {
    "picard_step": parse_params(
        f"const T* z, const T* fz, T* z_out, {_BOOKKEEPING}, long long n, T beta, T tol, "
        "T atol, T tiny, int first"
    ),
    "anderson_step": parse_params(
        f"const T* z, const T* fz, T* z_out, T* X, T* G, T* H, {_BOOKKEEPING}, long long n, "
        "int m, int e, T beta, T reg, T max_coeff, T tol, T atol, T tiny, int first"
    ),
    "broyden_step": parse_params(
        f"const T* z, const T* fz, T* z_out, T* Zc, T* Gc, T* Hg, T* U, T* V, {_BOOKKEEPING}, "
        "long long n, int mem, int e, T eps, T tol, T atol, T tiny, int first"
    ),
}


def kernel_name(kernel: str, dtype: str) -> str:
    """Exported symbol of ``kernel`` for numpy dtype name ``dtype`` (``eqs_<kernel>_f64``)."""
    return f"eqs_{kernel}_{DTYPES[dtype][1]}"


def exported_names() -> list[str]:
    """Every ``extern "C"`` kernel symbol of :func:`cuda_source`."""
    return [kernel_name(k, d) for d in DTYPES for k in KERNELS]


def c_param(p: Param, ctype: str) -> str:
    """``p`` as a C parameter declaration with ``T`` replaced by ``ctype``."""
    return f"{p.ctype.replace('T', ctype)} {p.name}"


def export_wrappers(kernels: dict[str, tuple[Param, ...]]) -> str:
    """``extern "C" __global__`` exports of ``eqs_<kernel>_impl<T>``, per kernel and dtype."""
    lines = []
    for dtype, (ctype, _) in DTYPES.items():
        for kernel, params in kernels.items():
            sig = ", ".join(c_param(p, ctype) for p in params)
            args = ", ".join(p.name for p in params)
            lines.append(
                f'extern "C" __global__ void {kernel_name(kernel, dtype)}({sig}) '
                f"{{ eqs_{kernel}_impl<{ctype}>({args}); }}"
            )
    return "\n".join(lines) + "\n"


@cache
def device_code() -> str:
    """The text of ``kernels.cu`` (the kernel templates, no exports)."""
    return resources.files(_PACKAGE).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


def cuda_source() -> str:
    """The whole CUDA C++ module: ``kernels.cu`` and the exports of every kernel, float32
    and float64. ``#line`` markers keep compiler messages on ``kernels.cu``'s own lines."""
    return (
        f'#line 1 "{SOURCE_FILE}"\n'
        + device_code()
        + '#line 1 "kernels-exports.cu"\n'
        + export_wrappers(KERNELS)
    )
