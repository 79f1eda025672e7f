"""y = U (V x) in ONE kernel launch for small batches (Triton on CUDA; torch elsewhere).

Decoding a factorized model at batch 1-16 is two skinny GEMVs per matrix: t = V x (k values)
then y = U t. Each program of the kernel below owns a block of the rank dimension: it reads
its rows of V (BLOCK_K x n) to get its slice of t, then its columns of U (out x BLOCK_K) and
adds U[:, block] t[block] into an fp32 output with atomics. V and U are read once in total
(the weight-read floor of the factorized matrix); the intermediate t never leaves the chip.
The additions' order varies between runs (float atomics): results agree with the two-GEMM
path to rounding, not bit for bit.

UNMEASURED: no GPU was available where this was written; ``benchmarks/gpu_decode.sh`` times
it (regime ``graph-kernel``). Keep it only if it measures faster (docs/inference.md).

:func:`enable_lowrank_kernel` swaps every factorized module (``svd_u``/``svd_v`` children,
duck typed) for :class:`LowRankKernelLinear`, which keeps the same children (same state
dict) and falls back to ``svd_u(svd_v(x))`` on the CPU, without Triton, or above
``max_tokens`` rows (prefill: cuBLAS is the better kernel there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path only
    triton = None

__all__ = [
    "available",
    "lowrank_linear",
    "LowRankKernelLinear",
    "enable_lowrank_kernel",
    "disable_lowrank_kernel",
]

MAX_TOKENS = 16  # rows the kernel handles (tl.dot needs >= 16 padded rows: one tile)


def available() -> bool:
    """Triton importable and a CUDA device present."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _lowrank_kernel(
        x_ptr,
        v_ptr,
        u_ptr,
        y_ptr,
        M,
        N,
        K,
        OUT,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_OUT: tl.constexpr,
    ):
        pid_k = tl.program_id(0)  # block of the rank dimension
        pid_o = tl.program_id(1)  # split of the output rows (more programs than rank blocks alone)
        rm = tl.arange(0, BLOCK_M)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        t = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # t = x V^T for this rank block
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            x = tl.load(
                x_ptr + rm[:, None] * N + rn[None, :], mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0
            )
            v = tl.load(
                v_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0
            )
            t += tl.dot(x, tl.trans(v))
        t = t.to(u_ptr.dtype.element_ty)
        per_split = tl.cdiv(OUT, tl.num_programs(1))
        end = tl.minimum(OUT, (pid_o + 1) * per_split)  # rows past it belong to the next split
        for o0 in range(pid_o * per_split, end, BLOCK_OUT):
            ro = o0 + tl.arange(0, BLOCK_OUT)
            u = tl.load(
                u_ptr + ro[:, None] * K + rk[None, :], mask=(ro[:, None] < end) & (rk[None, :] < K), other=0.0
            )
            part = tl.dot(t, tl.trans(u))  # (BLOCK_M, BLOCK_OUT)
            tl.atomic_add(
                y_ptr + rm[:, None] * OUT + ro[None, :], part, mask=(rm[:, None] < M) & (ro[None, :] < end)
            )


def _kernel(x2: torch.Tensor, V: torch.Tensor, U: torch.Tensor, splits: int = 4) -> torch.Tensor:
    M, N = x2.shape  # (tokens, n)
    K, OUT = V.shape[0], U.shape[0]  # V (k, n), U (out, k)
    y = torch.zeros((M, OUT), device=x2.device, dtype=torch.float32)
    BLOCK_K = 16
    grid = (triton.cdiv(K, BLOCK_K), splits)
    _lowrank_kernel[grid](x2, V, U, y, M, N, K, OUT, BLOCK_M=16, BLOCK_K=BLOCK_K, BLOCK_N=128, BLOCK_OUT=64)
    return y.to(x2.dtype)


def lowrank_linear(
    x: torch.Tensor,
    V: torch.Tensor,
    U: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_tokens: int = MAX_TOKENS,
) -> torch.Tensor:
    """``F.linear(F.linear(x, V), U, bias)``, one Triton launch when it applies."""
    rows = x.numel() // x.shape[-1]
    if not (x.is_cuda and triton is not None and rows <= min(max_tokens, MAX_TOKENS)):
        return F.linear(F.linear(x, V), U, bias)
    y = _kernel(x.reshape(rows, x.shape[-1]).contiguous(), V.contiguous(), U.contiguous())
    y = y.reshape(*x.shape[:-1], U.shape[0])
    return y if bias is None else y + bias


class LowRankKernelLinear(nn.Module):
    """A factorized layer whose forward is :func:`lowrank_linear`; same ``svd_u``/``svd_v`` children."""

    def __init__(self, original: nn.Module, max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.svd_v, self.svd_u = original.svd_v, original.svd_u
        self.in_features, self.out_features = self.svd_v.in_features, self.svd_u.out_features
        self.max_tokens = max_tokens
        self.__dict__["original"] = original  # not a child: the state dict keeps its names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.svd_v.weight, self.svd_u.weight, self.svd_u.bias, self.max_tokens)


def _is_factorized(module: nn.Module) -> bool:
    return isinstance(getattr(module, "svd_u", None), nn.Linear) and isinstance(
        getattr(module, "svd_v", None), nn.Linear
    )


def enable_lowrank_kernel(model: nn.Module, max_tokens: int = MAX_TOKENS) -> int:
    """Swap, in place, every factorized module for :class:`LowRankKernelLinear`; how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_factorized(child) and not isinstance(child, LowRankKernelLinear):
                setattr(parent, name, LowRankKernelLinear(child, max_tokens))
                swapped += 1
    return swapped


def disable_lowrank_kernel(model: nn.Module) -> int:
    """Put the original modules back; how many."""
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LowRankKernelLinear):
                setattr(parent, name, child.original)
                restored += 1
    return restored
