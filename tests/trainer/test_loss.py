import pytest
import torch
import torch.nn.functional as F

from moba_train.job.loss import chunked_lm_loss_sum


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000], ids=lambda c: f"chunk{c}")
def test_chunked_loss_and_grads_equal_full_logits(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 40))
    labels[0, :5] = -100
    labels[1, -1] = -100

    got = chunked_lm_loss_sum(hidden, head, labels, chunk)
    g_hidden, g_head = torch.autograd.grad(got, (hidden, head.weight))
    want = F.cross_entropy(head(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=-100, reduction="sum")
    w_hidden, w_head = torch.autograd.grad(want, (hidden, head.weight))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_hidden, w_hidden)
    torch.testing.assert_close(g_head, w_head)


def test_all_masked_chunk_contributes_zero():
    head = torch.nn.Linear(4, 9)
    loss = chunked_lm_loss_sum(torch.randn(1, 6, 4), head, torch.full((1, 6), -100), 2)
    assert loss.item() == 0.0
