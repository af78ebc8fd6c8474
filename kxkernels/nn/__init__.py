"""nn.Module wrappers of the kxkernels ops (API: ../shared/API.md, "Modules and integrations")."""
from kxkernels.nn.attention import RoPEAttention
