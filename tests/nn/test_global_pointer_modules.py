"""kxkernels.nn.GlobalPointer / EfficientGlobalPointer: logits against the head computed by hand
over the float64 eager reference, .loss against the dense ZLPR of the logits, the two Efficient
conventions, bert4torch state dicts and layers, gradients, bad input."""
import pytest
import torch

import kxkernels as kx
import kxkernels.nn as kxnn
from kxkernels.ops.global_pointer import reference as ref

# (atol, rtol) of the module in float32 against the float64 reference on the same weights.
TOL32 = (2e-5, 2e-5)
B, L, HIDDEN, HEADS, D = 2, 9, 24, 3, 8


def _mask():
    m = torch.ones(B, L, dtype=torch.bool)
    m[1, 6:] = False  # second sequence padded after 6 tokens
    return m


def _spans():
    """int64 (B, HEADS, 3, 2) positives inside the real tokens, padding -1."""
    s = torch.full((B, HEADS, 3, 2), -1, dtype=torch.long)
    s[0, 0, 0], s[0, 0, 1], s[0, 2, 0] = torch.tensor([0, 2]), torch.tensor([4, 4]), torch.tensor([1, 8])
    s[1, 1, 0], s[1, 1, 1], s[1, 2, 0] = torch.tensor([0, 0]), torch.tensor([2, 5]), torch.tensor([3, 4])
    return s


def _close(actual, expected, what, tol=TOL32):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol[0], rtol=tol[1], msg=what,
                               equal_nan=False)


def _gp_expected(head, hidden, mask):
    """GlobalPointer by hand in float64: dense, per-type chunks [q | k], reference scores."""
    W, b = head.dense.weight.double(), head.dense.bias.double()
    x = (hidden.double() @ W.T + b).view(B, L, HEADS, 2 * D).permute(0, 2, 1, 3)
    return ref.global_pointer(x[..., :D].contiguous(), x[..., D:].contiguous(), mask=mask,
                              rope=head.rope, tril=head.tril)


def _egp_expected(head, hidden, mask):
    """Efficient GlobalPointer by hand in float64, cell by cell for the biases (no shared code
    with the module's split): scale * R q . R k + start[h, i] + end[h, j]."""
    p = hidden.double() @ head.p_dense.weight.double().T + head.p_dense.bias.double()
    bias = (p @ head.q_dense.weight.double().T + head.q_dense.bias.double()) / 2  # (B, L, 2H)
    if head.convention == "bert4keras":
        q, k = p[..., [2 * c for c in range(D)]], p[..., [2 * c + 1 for c in range(D)]]
        start = torch.stack([bias[..., 2 * h + 1] for h in range(HEADS)], 1)
        end = torch.stack([bias[..., 2 * h] for h in range(HEADS)], 1)
    else:
        q, k = p[..., :D], p[..., D:]
        start = torch.stack([bias[..., 2 * h] for h in range(HEADS)], 1)
        end = torch.stack([bias[..., 2 * h + 1] for h in range(HEADS)], 1)
    qr, kr = q[:, None], k[:, None]  # (B, 1, L, D): one q / k for every type
    if head.rope:
        qr, kr = ref.apply_rope(qr), ref.apply_rope(kr)
    s = (qr @ kr.transpose(-1, -2)) * D ** -0.5 + start[..., :, None] + end[..., None, :]
    keep = ref.score_mask(B, L, mask, head.tril, hidden.device)
    return s.masked_fill(~keep, float("-inf"))


def _make(kind, **kw):
    if kind == "gp":
        return kxnn.GlobalPointer(HIDDEN, HEADS, head_size=D, **kw)
    return kxnn.EfficientGlobalPointer(HIDDEN, HEADS, head_size=D, convention=kind, **kw)


KINDS = ["gp", "bert4keras", "bert4torch"]


def _expected(kind, head, hidden, mask):
    return _gp_expected(head, hidden, mask) if kind == "gp" else _egp_expected(head, hidden, mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rope,tril", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_matches_reference_head(kind, rope, tril, masked):
    head = _make(kind, rope=rope, tril=tril)
    hidden = torch.randn(B, L, HIDDEN)
    mask = _mask() if masked else None
    out = head(hidden, mask=mask)
    assert out.shape == (B, HEADS, L, L) and out.dtype == torch.float32
    expected = _expected(kind, head, hidden, mask)
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected)), "masked cells must be exactly -inf"
    _close(out, expected, f"{kind} logits")


@pytest.mark.parametrize("kind", KINDS)
def test_forward_float64(kind):
    head = _make(kind).double()
    hidden = torch.randn(B, L, HIDDEN, dtype=torch.float64)
    out = head(hidden, mask=_mask())
    assert out.dtype == torch.float64
    _close(out, _expected(kind, head, hidden, _mask()), f"{kind} logits float64", tol=(1e-10, 1e-10))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True])
def test_loss_is_mcce_of_logits(kind, masked):
    head = _make(kind)
    hidden = torch.randn(B, L, HIDDEN, requires_grad=True)
    mask, spans = (_mask() if masked else None), _spans()
    loss = head.loss(hidden, spans, mask=mask)
    grads = torch.autograd.grad(loss, [hidden, *head.parameters()])

    logits = head(hidden, mask=mask)
    labels = ref.spans_to_labels(spans, L).flatten(-2).to(logits.dtype)
    dense = kx.multilabel_categorical_crossentropy(logits.flatten(-2), labels).mean()
    dense_grads = torch.autograd.grad(dense, [hidden, *head.parameters()])
    _close(loss, dense, "loss", tol=(1e-5, 1e-5))
    for g, gd in zip(grads, dense_grads):
        _close(g, gd, "gradient of .loss vs dense ZLPR", tol=(1e-5, 1e-4))

    rows = head.loss(hidden, spans, mask=mask, reduction="none")
    assert rows.shape == (B, HEADS)
    _close(rows.mean(), loss, "reduction none vs mean", tol=(1e-6, 1e-6))
    # and the float64 reference of the whole thing, from the hand-computed logits
    exp = _expected(kind, head, hidden.detach(), mask)
    ref_loss = ref.multilabel_categorical_crossentropy(exp.flatten(-2), labels.double()).mean()
    _close(loss, ref_loss, "loss vs float64 reference", tol=(1e-5, 1e-5))


# low precision: the module in bf16 / fp16 against the same module in float32 (rounded weights)
LOW_TOL = {torch.bfloat16: (0.15, 5e-2), torch.float16: (2e-2, 1e-2)}  # logits are O(1..10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gp", "bert4torch"])
def test_low_precision(kind, dtype):
    head = _make(kind).to(dtype)
    hidden = torch.randn(B, L, HIDDEN).to(dtype)
    head32 = _make(kind)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    out = head(hidden, mask=_mask())
    assert out.dtype == dtype
    expected = head32(hidden.float(), mask=_mask())
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    keep = torch.isfinite(expected)
    _close(out[keep], expected[keep], f"{dtype} logits", tol=LOW_TOL[dtype])
    loss = head.loss(hidden, _spans(), mask=_mask())
    assert torch.isfinite(loss)
    _close(loss, head32.loss(hidden.float(), _spans(), mask=_mask()), f"{dtype} loss", tol=LOW_TOL[dtype])


def test_conventions_differ_and_convert():
    """The same weights score differently under the two conventions; permuting the weights
    (even/odd <-> halves of p, start/end swapped in q_dense) maps one onto the other exactly."""
    keras = _make("bert4keras")
    torch_ = _make("bert4torch")
    hidden, mask = torch.randn(B, L, HIDDEN), _mask()
    torch_.load_state_dict(keras.state_dict())
    a, b = keras(hidden, mask), torch_(hidden, mask)
    finite = torch.isfinite(a)
    assert (a[finite] - b[finite]).abs().max() > 1e-2

    halves_from_pairs = torch.tensor([2 * c for c in range(D)] + [2 * c + 1 for c in range(D)])
    swap = torch.tensor([c ^ 1 for c in range(2 * HEADS)])  # (end, start) pairs -> (start, end)
    sd = keras.state_dict()
    converted = {
        "p_dense.weight": sd["p_dense.weight"][halves_from_pairs],
        "p_dense.bias": sd["p_dense.bias"][halves_from_pairs],
        "q_dense.weight": sd["q_dense.weight"][swap][:, halves_from_pairs],
        "q_dense.bias": sd["q_dense.bias"][swap],
    }
    torch_.load_state_dict(converted)
    _close(torch_(hidden, mask), a, "converted bert4keras -> bert4torch", tol=(1e-5, 1e-5))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow(kind):
    head = _make(kind)
    hidden = torch.randn(B, L, HIDDEN, requires_grad=True)
    mask = _mask()
    head.loss(hidden, _spans(), mask=mask).backward()
    for name, p in [("hidden", hidden), *head.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    assert hidden.grad[1, 6:].abs().max() == 0, "padded tokens must get no gradient"

    head.zero_grad()
    out = head(hidden, mask=mask)
    out.masked_fill(torch.isneginf(out), 0).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_layout():
    gp = kxnn.GlobalPointer(HIDDEN, HEADS, head_size=D)
    assert {k: tuple(v.shape) for k, v in gp.state_dict().items()} == {
        "dense.weight": (HEADS * D * 2, HIDDEN), "dense.bias": (HEADS * D * 2,)}
    egp = kxnn.EfficientGlobalPointer(HIDDEN, HEADS, head_size=D)
    assert {k: tuple(v.shape) for k, v in egp.state_dict().items()} == {
        "p_dense.weight": (2 * D, HIDDEN), "p_dense.bias": (2 * D,),
        "q_dense.weight": (2 * HEADS, 2 * D), "q_dense.bias": (2 * HEADS,)}
    assert set(kxnn.GlobalPointer(HIDDEN, HEADS, bias=False).state_dict()) == {"dense.weight"}


# ---- bert4torch: its state dicts load, and the logits agree with its layers ---------------------
def _bert4torch_layers():
    from benchmarks.peers import PeerUnavailable, import_bert4torch_layers
    try:
        return import_bert4torch_layers()
    except PeerUnavailable as e:
        pytest.skip(f"bert4torch cannot be imported here: {e}")


def _agree_with_peer(ours, theirs_logits, what):
    """bert4torch writes -inf on padding but a large finite number (about -1e12) below the
    diagonal: ours must be -inf exactly where bert4torch masks, and equal elsewhere."""
    peer_masked = theirs_logits < -1e9
    assert torch.equal(torch.isneginf(ours), peer_masked), f"{what}: masked cells differ"
    keep = ~peer_masked
    _close(ours[keep], theirs_logits[keep], what, tol=(1e-5, 1e-5))


@pytest.mark.parametrize("masked", [False, True])
def test_bert4torch_global_pointer_state_dict(masked):
    layers = _bert4torch_layers()
    theirs = layers.GlobalPointer(HIDDEN, HEADS, D).eval()
    ours = kxnn.GlobalPointer(HIDDEN, HEADS, head_size=D)
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    hidden, mask = torch.randn(B, L, HIDDEN), _mask()
    with torch.no_grad():
        t = theirs(hidden, mask.long() if masked else None)
    _agree_with_peer(ours(hidden, mask if masked else None).detach(), t, "GlobalPointer vs bert4torch")


@pytest.mark.parametrize("masked", [False, True])
def test_bert4torch_efficient_global_pointer_state_dict(masked):
    layers = _bert4torch_layers()
    theirs = layers.EfficientGlobalPointer(HIDDEN, HEADS, D).eval()
    ours = kxnn.EfficientGlobalPointer(HIDDEN, HEADS, head_size=D, convention="bert4torch")
    ours.load_state_dict(theirs.state_dict())
    hidden, mask = torch.randn(B, L, HIDDEN), _mask()
    with torch.no_grad():
        t = theirs(hidden, mask.long() if masked else None)
    _agree_with_peer(ours(hidden, mask if masked else None).detach(), t, "EfficientGlobalPointer vs bert4torch")
    # the bert4keras convention on bert4torch's weights is a different model
    other = kxnn.EfficientGlobalPointer(HIDDEN, HEADS, head_size=D, convention="bert4keras")
    other.load_state_dict(theirs.state_dict())
    o = other(hidden).detach()
    assert (o[torch.isfinite(o)] - ours(hidden).detach()[torch.isfinite(o)]).abs().max() > 1e-2


def test_bert4torch_loss_matches():
    """bert4torch's MultilabelCategoricalCrossentropy over its logits and dense labels (no
    padding: its -inf would poison (1 - 2y) * s) equals .loss per (batch, type) row."""
    layers = _bert4torch_layers()
    from bert4torch.losses import MultilabelCategoricalCrossentropy

    theirs = layers.EfficientGlobalPointer(HIDDEN, HEADS, D)
    ours = kxnn.EfficientGlobalPointer(HIDDEN, HEADS, head_size=D, convention="bert4torch")
    ours.load_state_dict(theirs.state_dict())
    hidden, spans = torch.randn(B, L, HIDDEN), _spans()
    labels = ref.spans_to_labels(spans, L).float()
    peer = MultilabelCategoricalCrossentropy()(theirs(hidden).reshape(B * HEADS, -1), labels.reshape(B * HEADS, -1))
    _close(ours.loss(hidden, spans), peer.detach(), "loss vs bert4torch", tol=(1e-5, 1e-5))


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(hidden_size=0, heads=2), ValueError, "hidden_size"),
    (dict(hidden_size=8, heads=2.0), TypeError, "heads"),
    (dict(hidden_size=8, heads=True), TypeError, "heads"),
    (dict(hidden_size=8, heads=2, head_size=-4), ValueError, "head_size"),
    (dict(hidden_size=8, heads=2, head_size=7), ValueError, "head_size"),
])
@pytest.mark.parametrize("cls", [kxnn.GlobalPointer, kxnn.EfficientGlobalPointer])
def test_bad_constructor_args(cls, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        cls(**kwargs)


def test_odd_head_size_without_rope_and_bad_convention():
    kxnn.GlobalPointer(8, 2, head_size=7, rope=False)(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="convention"):
        kxnn.EfficientGlobalPointer(8, 2, convention="paddlenlp")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs(kind):
    head = _make(kind)
    hidden = torch.randn(B, L, HIDDEN)
    with pytest.raises(ValueError, match="hidden"):
        head(torch.randn(B, L, HIDDEN + 1))
    with pytest.raises(ValueError, match="hidden"):
        head(torch.randn(L, HIDDEN))
    with pytest.raises(TypeError, match="hidden"):
        head(torch.randint(3, (B, L, HIDDEN)))
    with pytest.raises(TypeError, match="hidden"):
        head.loss([[0.0]], _spans())
    with pytest.raises((ValueError, TypeError), match="mask"):
        head(hidden, mask=torch.ones(B, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        head(hidden, mask=torch.ones(B, L))
    with pytest.raises((ValueError, TypeError), match="spans"):
        head.loss(hidden, _spans()[:, :2])               # wrong head count
    with pytest.raises(ValueError, match="spans"):
        head.loss(hidden, torch.tensor([[[[2, 1]]] * HEADS] * B))  # start > end
    with pytest.raises(ValueError, match="spans"):
        head.loss(hidden, torch.tensor([[[[0, L]]] * HEADS] * B))  # end out of range
    with pytest.raises(TypeError, match="spans"):
        head.loss(hidden, _spans().float())


def test_docstring_examples():
    import doctest

    import kxkernels.nn.global_pointer as module
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
