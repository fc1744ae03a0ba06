"""mixdit.kernels: Triton kernels with their launchers, autograd Functions and custom ops.

Naive PyTorch references live in :mod:`mixdit.kernels.reference`.
"""

from .block_sparse_attention import (
    BlockSparseAttentionFunction,
    block_sparse_attention,
    block_sparse_attention_backward,
    block_sparse_attention_forward,
    transpose_layout,
)

__all__ = [
    "BlockSparseAttentionFunction",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "block_sparse_attention_forward",
    "transpose_layout",
]
