"""kxkernels: fused kernels for RoFormer-line NLP building blocks. The public API is ../shared/API.md."""
from kxkernels._extension import build_info
from kxkernels.ops.global_pointer import (decode_spans, global_pointer, global_pointer_loss,
                                         multilabel_categorical_crossentropy,
                                         sparse_multilabel_categorical_crossentropy)
from kxkernels.ops.rope_attention import apply_rope, rope_attention
from kxkernels.ops.linear_attention import causal_linear_attention, linear_attention
from kxkernels.ops.sinkhorn import SinkhornResult, sinkhorn, wrd
from kxkernels.ops.sparse_softmax import sparse_softmax, sparse_softmax_cross_entropy

from kxkernels import nn  # noqa: E402,F401  (kxkernels.nn.* modules)

__all__ = ["build_info", "sparse_softmax", "sparse_softmax_cross_entropy", "sinkhorn", "wrd", "SinkhornResult",
           "global_pointer", "multilabel_categorical_crossentropy", "sparse_multilabel_categorical_crossentropy",
           "global_pointer_loss", "decode_spans", "apply_rope", "rope_attention",
           "causal_linear_attention", "linear_attention"]
__version__ = "0.1.0"
