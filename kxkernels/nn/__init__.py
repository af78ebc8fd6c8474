"""nn.Module wrappers over the kxkernels ops (API: ../shared/API.md, "Modules and integrations")."""
from kxkernels.nn.global_pointer import EfficientGlobalPointer, GlobalPointer
from kxkernels.nn.attention import RoPEAttention
