"""nn.Module wrappers of the kxkernels ops (one module file per op family)."""
from kxkernels.nn.linear_attention import CausalLinearAttention, LinearAttentionState

__all__ = ["CausalLinearAttention", "LinearAttentionState"]
