"""cupyflash: exact, IO-aware attention (FlashAttention) as CUDA kernels JIT-compiled through CuPy.

Faces (reference: docs/API.md):
- torch: ``cupyflash.flash_attention(q, k, v, attn_bias=None, *, scale=None, causal=False, window=(-1, -1),
  dropout_p=0.0, softcap=0.0)`` and the custom ops ``torch.ops.cupyflash.flash_attn_fwd`` / ``flash_attn_bwd``
  (``cupyflash.torch_op``);
- CuPy: ``cupyflash.cupy_api.flash_attn_forward`` / ``flash_attn_backward`` on CuPy arrays;
- ``torch.compile(model, backend="cupyflash")`` (the ``compile_backend`` package).

Importing this package needs neither torch nor a GPU; each face imports what it needs on first use.
"""
__version__ = "0.1.0"

from . import log as _log

_log.setup()  # honours CUPYFLASH_LOG; stdlib only, so the import stays torch- and GPU-free

_TORCH_NAMES = ("flash_attention", "flash_attn_fwd", "flash_attn_bwd", "why_unsupported")

import sys as _sys


def _bind_torch_names():
    """The torch face's names as attributes of the package: `cupyflash.flash_attention` in a loop is then a plain
    attribute read, where the module __getattr__ below took ~3 µs a call (benchmarks/host_overhead.py --cpu-stub)."""
    from . import torch_op

    for name in _TORCH_NAMES:
        globals()[name] = getattr(torch_op, name)


# torch is loaded already (None there means an import was blocked): register torch.ops.cupyflash.* now, at no cost.
if _sys.modules.get("torch") is not None:
    _bind_torch_names()


def __getattr__(name):
    if name in _TORCH_NAMES:
        _bind_torch_names()
        return globals()[name]
    raise AttributeError(f"module 'cupyflash' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_TORCH_NAMES})  # the lazy names too, without importing torch
