"""DDP (torch.distributed, gloo, CPU): two processes each run a training step of a small model that
uses ``sparse_softmax_cross_entropy`` and ``wrd`` on half of a batch; the gradients DDP averages
equal those of one process on the whole batch.

The ranks meet through a file (no port to pick) and talk over loopback only
(``GLOO_SOCKET_IFNAME=lo``); the whole run is bounded (``TIMEOUT_S``), a hung or crashed rank
fails the test. Tolerance: float32, atol 1e-6 / rtol 1e-5 -- the two sides sum the same terms in a
different order (half-batch means averaged vs one mean), nothing else differs.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kxkernels as kx

WORLD = 2
TIMEOUT_S = 120
VOCAB, DIM, K = 300, 16, 8
BATCH, SEQ = 8, 12                 # global batch; each rank gets BATCH // WORLD sequences
WRD_WEIGHT = 0.5
ATOL, RTOL = 1e-6, 1e-5


class TinyLM(torch.nn.Module):
    """Token embeddings -> a small MLP -> vocabulary logits: sparse softmax CE on next tokens, plus
    WRD between the hidden states of the first and second half of each sequence."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.mix = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, tokens, target):
        h = torch.tanh(self.mix(self.embed(tokens)))                      # (b, SEQ, DIM)
        ce = kx.sparse_softmax_cross_entropy(self.head(h), target, K)     # mean over b * SEQ rows
        half = SEQ // 2
        w = kx.wrd(h[:, :half], h[:, half:]).mean()                       # mean over b pairs
        return ce + WRD_WEIGHT * w


def _model():
    torch.manual_seed(0)
    return TinyLM()


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(VOCAB, (BATCH, SEQ), generator=g)
    target = torch.roll(tokens, -1, dims=1)
    return tokens, target


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        tokens, target = _batch()
        share = BATCH // WORLD
        rows = slice(rank * share, (rank + 1) * share)
        loss = model(tokens[rows], target[rows])
        model.zero_grad(set_to_none=True)
        loss.backward()                                                   # DDP all-reduces (averages)
        grads = {n: p.grad.detach().clone() for n, p in model.module.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_ddp_two_processes_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()

    model = _model()
    tokens, target = _batch()
    loss = model(tokens, target)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # the global loss is the mean of the ranks' losses (equal shares, no ignored rows)
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach(), atol=ATOL, rtol=RTOL)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        for r, out in enumerate(ranks):
            torch.testing.assert_close(out["grads"][name], p.grad, atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"rank {r} gradient of {name}: {m}")
