"""nn.Module wrappers over the kxkernels ops (API: ../shared/API.md, "Modules and integrations")."""
from kxkernels.nn.attention import RoPEAttention
from kxkernels.nn.global_pointer import EfficientGlobalPointer, GlobalPointer
from kxkernels.nn.linear_attention import CausalLinearAttention, LinearAttentionState

__all__ = ["RoPEAttention", "GlobalPointer", "EfficientGlobalPointer", "CausalLinearAttention", "LinearAttentionState"]
