"""C++ CPU local attention that visits only each query's k x k window (``csrc/local_attention_cpu.cpp``).

The kernel scores each query against its own k^2 window keys (49 at k = 7), where ``tiled`` scores a whole halo
(196 at stride 1). No padded copy of k or v is made and no k^2 map is stored: the forward keeps only the softmax
log-sum-exp (B, N, Ho, Wo), and the backward recomputes the weights from it (FlashAttention style). The reflection
border is index arithmetic, the relative position term is subtracted from the keys inside the kernel
(``q_i . (k_j + p_i - p_j)`` has the softmax of ``q_i . (k_j - p_j)``), and its gradient is ``-dk`` summed over the
dimensions ``rel_pos`` broadcasts over. q, k, v may be strided views (e.g. chunks of the layer's qkv projection);
only a non-unit stride along W costs a copy.

Build. The source is compiled on first use, not at import, with ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler needed; ``-O3`` plus ``-march=native`` / ``-mcpu=native`` and OpenMP, since the build happens on the
machine that runs it). The result is cached under ``ACMIX_EXTENSIONS_DIR`` (default: torch's extension cache,
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), in a folder keyed on the source, the torch version, the
flags and the CPU's feature flags; later processes load it in about a second. torch's build holds a file lock, so
two processes building at once do not corrupt the cache. With no compiler, no ninja, or a failing build, the backend
reports ``can_run -> (False, reason)``, logs the reason once (WARNING), and the call that found out runs ``tiled``;
``ACMIX_NO_CPP=1`` turns the backend off.

The ops are declared with ``TORCH_LIBRARY(acmix_cpp, ...)`` (``torch.ops.acmix_cpp.local_attention_fwd`` /
``_bwd``) and get their autograd and fake (meta) kernels here, so ``torch.compile`` traces them without a graph
break and ``torch.export`` records them.

Dtypes: float32 and float64 are computed natively; float16 and bfloat16 are upcast to float32 (one copy of q, k,
v) and the result is cast back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..._env import env_extensions_dir, env_no_cpp
from .._window import Window, attention_backend
from .offset import compute_dtype
from .tiled import local_attention_tiled

_logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "local_attention_cpu.cpp"
NAMESPACE = "acmix_cpp"


@dataclass
class _State:
    """Build state of this process: ``unbuilt`` (not tried yet), ``loaded`` or ``failed`` (with the reason)."""

    status: str = "unbuilt"
    reason: str = ""
    path: str = ""


_STATE = _State()
_LOCK = threading.Lock()
_REGISTERED = False


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), else the processor name: part of the build key."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _native_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def build_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) passed to ``torch.utils.cpp_extension.load``."""
    return ["-O3", *_native_flags(), "-fopenmp"], ["-fopenmp"]


def build_name() -> str:
    """Extension name: a hash of the source, torch version, compiler, flags and CPU features (the cache key)."""
    cflags, ldflags = build_flags()
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        torch.__version__.encode(),
        sys.version.encode(),
        os.environ.get("CXX", "c++").encode(),
        " ".join(cflags + ldflags).encode(),
        _cpu_flags().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return f"{NAMESPACE}_{h.hexdigest()[:16]}"


def build_directory() -> Path:
    """Where the extension is built and cached (not created here)."""
    root = env_extensions_dir() or os.environ.get("TORCH_EXTENSIONS_DIR", "").strip()
    if not root:
        from torch._appdirs import user_cache_dir

        root = user_cache_dir(appname="torch_extensions")
    return Path(root) / build_name()


def toolchain() -> tuple[bool, str]:
    """Whether a C++ compiler and ninja are on PATH (cheap: no subprocess)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, f"no C++ compiler ({cxx!r} not found; set CXX)"
    if shutil.which("ninja") is None:
        return False, "ninja not found (pip install ninja)"
    return True, ""


def built_library() -> Path | None:
    """The cached shared library for this source, flags and CPU, if a build already exists on disk."""
    path = build_directory() / f"{build_name()}.so"
    return path if path.is_file() else None


def _compile_and_load() -> str:
    """Build (or reuse the cached build) and load it into torch.ops; returns the library path. Raises on failure."""
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cflags, ldflags = build_flags()
    path = cpp_extension.load(
        name=build_name(),
        sources=[str(SOURCE)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return str(path)


def _register_python_kernels() -> None:
    """Fake (meta) and autograd kernels of the two ops; once per process, after the library is loaded."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.library.register_fake(f"{NAMESPACE}::local_attention_fwd", _fwd_fake)
    torch.library.register_fake(f"{NAMESPACE}::local_attention_bwd", _bwd_fake)
    torch.library.register_autograd(
        f"{NAMESPACE}::local_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context
    )
    _REGISTERED = True


def load_library() -> bool:
    """Build / load the extension once per process; on failure log the reason once (WARNING) and return False."""
    if _STATE.status != "unbuilt":
        return _STATE.status == "loaded"
    with _LOCK:
        if _STATE.status != "unbuilt":
            return _STATE.status == "loaded"
        ok, reason = (False, "disabled by ACMIX_NO_CPP=1") if env_no_cpp() else toolchain()
        if ok:
            try:
                _STATE.path = _compile_and_load()
                _register_python_kernels()
            except Exception as exc:  # noqa: BLE001 -- any build or load failure means: fall back
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                ok, reason = False, f"build failed: {type(exc).__name__}: {first} (ACMIX_LOG_LEVEL=DEBUG for the log)"
                _logger.debug("cpp backend build log:\n%s", exc)
        if ok:
            _STATE.status = "loaded"
            _logger.debug("cpp backend loaded from %s", _STATE.path)
        else:
            _STATE.status, _STATE.reason = "failed", reason
            _logger.warning("acmix cpp backend unavailable, falling back to 'tiled': %s", reason)
        return ok


@torch.compiler.assume_constant_result
def _ensure_loaded() -> bool:
    """:func:`load_library`, run eagerly (and treated as a constant) while torch.compile traces."""
    return load_library()


@torch.compiler.assume_constant_result
def _availability() -> str:
    """'' when the backend may run (built, or not tried yet with a toolchain present), else the reason it cannot."""
    if _STATE.status == "failed":
        return _STATE.reason
    if _STATE.status == "loaded":
        return ""
    ok, reason = toolchain()
    return "" if ok else reason


def build_state() -> str:
    """One line for ``acmix info``: the state of the extension, without building it."""
    if env_no_cpp():
        return "disabled by ACMIX_NO_CPP=1"
    if _STATE.status == "loaded":
        return f"loaded ({_STATE.path})"
    if _STATE.status == "failed":
        return _STATE.reason
    ok, reason = toolchain()
    if not ok:
        return reason
    cached = built_library()
    return f"built, loads on first use ({cached})" if cached else "not built yet (builds on first use)"


def can_run_cpp(q: torch.Tensor) -> tuple[bool, str]:
    """CPU tensors, when the extension is loaded or can still be built, and ``ACMIX_NO_CPP`` is not set."""
    if q.device.type != "cpu":
        return False, f"CPU only (got {q.device.type})"
    if env_no_cpp():
        return False, "disabled by ACMIX_NO_CPP=1"
    reason = _availability()
    if reason:
        return False, reason
    return True, ""


# ------------------------------------------------------------------------------------------------ op kernels
def _out_hw(h: int, w: int, stride: int) -> tuple[int, int]:
    return (h + stride - 1) // stride, (w + stride - 1) // stride


def _fwd_fake(q, k, v, rel_pos, kernel_size, stride, scale):  # type: ignore[no-untyped-def]
    b, n, d, h, w = q.shape
    ho, wo = _out_hw(h, w, stride)
    return q.new_empty((b, n, d, ho, wo)), q.new_empty((b, n, ho, wo))


def _bwd_fake(grad_out, q, k, v, rel_pos, out, lse, kernel_size, stride, scale):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _fwd_setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    q, k, v, rel_pos, kernel_size, stride, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_pos, out, lse)
    ctx.meta = (kernel_size, stride, scale)


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a (B, N, D, H, W) gradient down to a (D, H, W) or broadcastable 5-D ``shape``."""
    if len(shape) == 3:
        return g.sum((0, 1))
    dims = [i for i in range(2) if shape[i] == 1 and g.shape[i] != 1]
    return g.sum(dims, keepdim=True) if dims else g


def _fwd_backward(ctx, grad_out, grad_lse):  # type: ignore[no-untyped-def]
    q, k, v, rel_pos, out, lse = ctx.saved_tensors
    kernel_size, stride, scale = ctx.meta
    dq, dk, dv = torch.ops.acmix_cpp.local_attention_bwd(
        grad_out, q, k, v, rel_pos, out, lse, kernel_size, stride, scale
    )
    dpos = None
    if rel_pos is not None and ctx.needs_input_grad[3]:
        dpos = -_reduce_to(dk, rel_pos.shape)
    return dq, dk, dv, dpos, None, None, None


@attention_backend
def local_attention_cpp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Window) -> torch.Tensor:
    """C++ window-only backend (contract: :mod:`acmix.ops._window`).

    Builds the extension on first use; if that fails, logs why once and computes with ``tiled`` instead. Each
    (D, H, W) slab of q, k, v needs a contiguous W axis (any batch / head strides); the output is contiguous.
    """
    if not _ensure_loaded():
        return local_attention_tiled(q, k, v, *w)
    cdt = compute_dtype(q.dtype)
    pos = None if w.rel_pos is None else w.rel_pos.to(cdt)
    out, _ = torch.ops.acmix_cpp.local_attention_fwd(
        q.to(cdt), k.to(cdt), v.to(cdt), pos, int(w.kernel_size), int(w.stride), w.scale
    )
    return out.to(q.dtype)
