import math

import pytest
import torch
import torch.nn.functional as F

from hvs.losses import (
    BCTLoss,
    CrossModelContrastive,
    L2Regression,
    MarginHead,
    margin_logits,
    parse_compat,
    synthesize_gallery_classifier,
)


def test_margin_logits_against_definitions():
    cos = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.9, 0.3]])
    y = torch.tensor([0, 1])
    assert torch.allclose(margin_logits(cos, y, "normface", 10.0, 0.3), 10 * cos)
    cf = margin_logits(cos, y, "cosface", 10.0, 0.3)
    assert torch.allclose(cf[0], 10 * torch.tensor([0.2, 0.2, -0.1]))
    assert torch.allclose(cf[1], 10 * torch.tensor([0.1, 0.6, 0.3]))
    af = margin_logits(cos, y, "arcface", 10.0, 0.3)
    assert math.isclose(float(af[0, 0]), 10 * math.cos(math.acos(0.5) + 0.3), rel_tol=1e-5)
    assert math.isclose(float(af[1, 1]), 10 * math.cos(math.acos(0.9) + 0.3), rel_tol=1e-5)
    assert torch.allclose(af[0, 1:], 10 * cos[0, 1:])
    with pytest.raises(ValueError, match="unknown margin loss"):
        margin_logits(cos, y, "sphereface", 1.0, 0.1)


def test_margin_head_cross_entropy():
    head = MarginHead(4, 3, "normface", scale=5.0)
    emb = F.normalize(torch.randn(6, 4), dim=-1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = F.cross_entropy(5.0 * emb @ F.normalize(head.weight, dim=-1).t(), y)
    assert torch.allclose(head(emb, y), expected)


def test_bct_loss_is_low_only_in_the_gallery_space():
    torch.manual_seed(0)
    w = F.normalize(torch.randn(5, 8), dim=-1)
    y = torch.arange(5)
    bct = BCTLoss(w, "cosface", 16.0, 0.1)
    aligned = bct(w[y], y)  # query embeddings exactly at the gallery class centres
    rotated = bct(torch.roll(w, 1, dims=1)[y], y)  # same geometry, another space
    assert aligned < 0.05 < rotated


def test_synthesized_rows_for_unseen_classes():
    g_weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    rows, synth = synthesize_gallery_classifier(
        g_weight, ["a", "b"], ["b", "new", "a"], lambda c: torch.tensor([3.0, 4.0])
    )
    assert synth == ["new"]
    assert torch.allclose(rows, torch.tensor([[0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]))


def test_l2_and_contrastive():
    q = F.normalize(torch.randn(4, 8), dim=-1)
    assert float(L2Regression()(q, None, ref_emb=q)) == 0.0
    y = torch.tensor([0, 0, 1, 1])
    con = CrossModelContrastive(0.1)
    matched = con(q, y, ref_emb=q, ref_labels=y)
    assert matched < con(q, y, ref_emb=-q, ref_labels=y)
    with pytest.raises(ValueError, match="gallery embeddings"):
        L2Regression()(q, y)


def test_parse_compat():
    assert parse_compat(["bct", "l2=0.5"]) == [("bct", 1.0), ("l2", 0.5)]
    assert parse_compat("none") == []
    assert parse_compat("bct,contrastive=2") == [("bct", 1.0), ("contrastive", 2.0)]
    with pytest.raises(ValueError, match="unknown compatibility loss 'kd'"):
        parse_compat(["kd"])
    with pytest.raises(ValueError, match="must be a number"):
        parse_compat(["bct=high"])


def test_compat_losses_are_modules_behind_a_registry():
    from torch import nn

    from hvs.losses import CompatLoss, create_compat_loss, list_compat_losses, register_compat_loss

    assert list_compat_losses()[:3] == ["bct", "l2", "contrastive"]
    con = create_compat_loss("contrastive", temperature=0.1)
    assert isinstance(con, nn.Module) and con.temperature == 0.1 and con.needs_ref and con.global_ref
    bct = create_compat_loss("bct", gallery_weight=torch.eye(3, 4))
    assert "weight" in dict(bct.named_buffers())  # moves with .to(device), never trained
    with pytest.raises(ValueError, match="unknown compatibility loss 'kd'; expected one of none, bct"):
        create_compat_loss("kd")

    @register_compat_loss("test-cosine")
    class CosineGap(CompatLoss):
        needs_ref = True

        def forward(self, query_emb, labels, ref_emb=None, ref_labels=None):
            return (1 - F.cosine_similarity(query_emb, ref_emb, dim=-1)).mean()

    try:
        assert parse_compat(["test-cosine=0.5"]) == [("test-cosine", 0.5)]  # usable as --compat at once
        q = F.normalize(torch.randn(4, 8), dim=-1)
        assert float(create_compat_loss("test-cosine")(q, None, ref_emb=q)) < 1e-6
        with pytest.raises(ValueError, match="registered twice"):
            register_compat_loss("test-cosine")(CosineGap)
    finally:
        from hvs import losses

        losses._COMPAT_REGISTRY.pop("test-cosine")


def test_relational_distillation_against_a_hand_computed_value():
    """Two anchors in 2-d: gallery g1 = (1, 0), g2 = (0, 1); query q1 = (1, 0), q2 = (1, 1)/sqrt2.
    cos(q, g) = [[1, 0], [s, s]] (s = 1/sqrt2), cos(g, g) = I: squared differences 0, 0, s^2, (s - 1)^2
    over 4 entries."""
    from hvs.losses import create_compat_loss

    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # unnormalised: the loss normalises
    s = 1 / math.sqrt(2)
    expected = (s**2 + (s - 1) ** 2) / 4
    rel = create_compat_loss("relational")
    assert float(rel(q, None, ref_emb=g)) == pytest.approx(expected, rel=1e-6)
    assert float(rel(g * 3.0, None, ref_emb=g)) == pytest.approx(0.0, abs=1e-7)  # the same directions: zero
    assert rel.needs_ref and not rel.global_ref
    with pytest.raises(ValueError, match="gallery embeddings"):
        rel(q, None)


def test_similarity_distribution_distillation_against_a_hand_computed_value():
    """The same two anchors at T = 0.5: the gallery rows are softmax([2, 0]) and softmax([0, 2]); the
    query's softmax([2, 0]) and softmax([2s, 2s]) = (1/2, 1/2). KL row 1 = 0; row 2 = sum p log(p / (1/2))."""
    from hvs.losses import create_compat_loss

    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    a = math.exp(2) / (1 + math.exp(2))  # softmax([0, 2])[1]
    row2 = (1 - a) * math.log((1 - a) / 0.5) + a * math.log(a / 0.5)
    sim = create_compat_loss("simdist", temperature=0.5)
    assert float(sim(q, None, ref_emb=g)) == pytest.approx(row2 / 2, rel=1e-6)
    assert float(sim(g, None, ref_emb=g)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature must be positive"):
        create_compat_loss("simdist", temperature=0.0)


@pytest.mark.parametrize("name", ["relational", "simdist"])
def test_distillation_gradients_pull_the_query_toward_the_gallery_view(name):
    """A few steps of gradient descent on the query embeddings alone lower the loss and bring each
    query's cosines to the anchors closer to the gallery model's (any seed: the loss is smooth and
    its minimum, q_i parallel to g_i, is reachable)."""
    from hvs.losses import create_compat_loss

    loss_fn = create_compat_loss(name)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        g = F.normalize(torch.randn(16, 8, generator=gen), dim=-1)
        q = torch.randn(16, 8, generator=gen).requires_grad_(True)
        opt = torch.optim.Adam([q], lr=0.05)
        first = float(loss_fn(q.detach(), None, ref_emb=g))
        for _ in range(200):
            opt.zero_grad()
            loss_fn(q, None, ref_emb=g).backward()
            opt.step()
        assert float(loss_fn(q.detach(), None, ref_emb=g)) < 0.5 * first, (name, seed)
