"""Eager reference for sparse softmax top-k (SPACES), readable first.

Sparse softmax (Su Jianlin, "SPACES: 抽取-生成式长文本摘要", 2021; "Sparse Softmax" in
bert4keras): keep the k largest logits of a row, take the softmax over them, set the rest to
exactly 0. The cross-entropy is logsumexp(top_k(x)) - x[target], whose gradient is
p * 1[top-k] - onehot(target). torch.topk does not promise which of equal values it keeps; the
kernels keep the lower index, which ``stable_ties=True`` reproduces with a stable sort (slower:
a full sort of each row; bf16 logits tie often).
"""
import torch


def topk(x: torch.Tensor, k: int, dim: int = -1, stable_ties: bool = False):
    """The k largest values of x along dim and their indices; ties to the lower index if stable_ties."""
    if not stable_ties:
        return torch.topk(x, k, dim=dim)
    index = torch.sort(x, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return x.gather(dim, index), index


def sparse_softmax(logits: torch.Tensor, k: int, dim: int = -1, stable_ties: bool = False) -> torch.Tensor:
    values, index = topk(logits, k, dim, stable_ties)
    probs = torch.softmax(values, dim=dim)
    return torch.zeros_like(logits).scatter(dim, index, probs)


def sparse_softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, k: int, *,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 include_target: bool = False, stable_ties: bool = False) -> torch.Tensor:
    x = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    values, index = topk(x, k, -1, stable_ties)
    x_target = x.gather(-1, t_safe[:, None])
    if include_target:
        # the target joins the set when it is not already among the top-k
        outside = (index != t_safe[:, None]).all(-1, keepdim=True)
        values = torch.cat([values, x_target.masked_fill(~outside, float("-inf"))], dim=-1)
    loss = torch.logsumexp(values, dim=-1) - x_target[:, 0]
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)
