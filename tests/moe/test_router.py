import math

import pytest
import torch

from lightning_moe.moe.router import TopKRouter


def _router(dim=2, experts=2, k=1, **kw):
    r = TopKRouter(dim, experts, k, **kw)
    return r


def _fixed_logits_router(logits_row, **kw):
    """A router whose logits are `logits_row` for the input x = [1, 0, ...]."""
    e = len(logits_row)
    r = _router(dim=2, experts=e, **kw)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[:, 0] = torch.tensor(logits_row)
    return r


def test_losses_match_hand_computed_values():
    # Both tokens: logits [0, ln 3] -> softmax [0.25, 0.75]; top-1 picks expert 1 for both.
    r = _fixed_logits_router([0.0, math.log(3)], aux_loss_coef=1.0, seq_aux_loss_coef=1.0, z_loss_coef=1.0)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = r(x, seq_len=2)
    assert out.expert_indices.flatten().tolist() == [1, 1]
    # aux = E * sum f_i P_i = 2 * (0 * 0.25 + 1 * 0.75) = 1.5
    assert out.losses["aux_loss"].item() == pytest.approx(1.5, abs=1e-6)
    # seq-wise, one sequence of 2: f = E/(K*S) * counts = [0, 2], P = [0.25, 0.75] -> 1.5
    assert out.losses["seq_aux_loss"].item() == pytest.approx(1.5, abs=1e-6)
    # z = logsumexp([0, ln 3])^2 = (ln 4)^2
    assert out.losses["z_loss"].item() == pytest.approx(math.log(4) ** 2, abs=1e-6)
    assert out.aux_loss.item() == pytest.approx(3.0 + math.log(4) ** 2, abs=1e-5)


def test_sequence_loss_differs_from_batch_loss():
    # Two sequences of one token each, routed to different experts: balanced over the batch, not per sequence.
    r = TopKRouter(2, 2, 1, aux_loss_coef=1.0, seq_aux_loss_coef=1.0)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * math.log(3))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # token 0 -> softmax [.75, .25], token 1 -> [.25, .75]
    out = r(x, seq_len=1)
    assert out.losses["aux_loss"].item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5), abs=1e-6)  # 1.0
    # per sequence: f = 2/(1*1) * one-hot, P = own probs -> 2 * 0.75 = 1.5 each
    assert out.losses["seq_aux_loss"].item() == pytest.approx(1.5, abs=1e-6)


def test_sigmoid_scores_and_scaling():
    r = _fixed_logits_router([0.0, 1.0, -1.0, 2.0], score_func="sigmoid", route_norm=True, route_scale=2.5)
    r.top_k = 2
    out = r(torch.tensor([[1.0, 0.0]]), seq_len=1)
    assert sorted(out.expert_indices[0].tolist()) == [1, 3]
    s = torch.sigmoid(torch.tensor([1.0, 2.0]))
    expected = 2.5 * s / s.sum()
    got = out.weights[0][out.expert_indices[0].argsort()]
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_limited_routing_stays_in_chosen_groups(seed, score_func):
    e, g, tg, k, t = 16, 4, 2, 4, 200
    r = TopKRouter(8, e, k, score_func=score_func, n_group=g, topk_group=tg, bias_update_speed=0.1)
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(e) * 0.1)
    x = torch.randn(t, 8)
    out = r(x, seq_len=t)
    logits = x @ r.gate.weight.T
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    choice = (scores + r.expert_bias).view(t, g, e // g)
    group_score = choice.topk(2, -1).values.sum(-1) if score_func == "sigmoid" else choice.amax(-1)
    allowed_groups = group_score.topk(tg, -1).indices  # [T, tg]
    chosen_groups = out.expert_indices // (e // g)
    for tok in range(t):
        assert set(chosen_groups[tok].tolist()) <= set(allowed_groups[tok].tolist())
    # and within the allowed groups, the best-scoring experts are taken
    masked = torch.full((t, e), float("-inf"))
    for tok in range(t):
        for grp in allowed_groups[tok].tolist():
            sl = slice(grp * (e // g), (grp + 1) * (e // g))
            masked[tok, sl] = (scores + r.expert_bias)[tok, sl]
    assert torch.equal(out.expert_indices.sort(-1).values, masked.topk(k, -1).indices.sort(-1).values)


def test_bias_changes_selection_not_gate_weights(seed):
    e, k, t = 8, 2, 64
    r = TopKRouter(16, e, k, score_func="sigmoid", bias_update_speed=0.01)
    x = torch.randn(t, 16)
    before = r(x, seq_len=t)
    with torch.no_grad():
        r.expert_bias[3] = 10.0  # expert 3 now always wins selection
    after = r(x, seq_len=t)
    assert (after.expert_indices == 3).any(-1).all()
    assert not torch.equal(before.expert_indices, after.expert_indices)
    # gate weights come from the unbiased scores of the chosen experts
    scores = torch.sigmoid(x @ r.gate.weight.T)
    expected = scores.gather(1, after.expert_indices)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(after.weights, expected)
    # no gradient reaches the bias
    after.weights.sum().backward()
    assert not r.expert_bias.requires_grad and r.gate.weight.grad is not None


def test_bias_update_balances_and_is_checkpointed(seed):
    r = TopKRouter(4, 4, 1, bias_update_speed=0.5)
    r.train()
    load = torch.tensor([10.0, 0.0, 5.0, 5.0])
    r.update_bias(load)
    assert r.expert_bias.tolist() == [-0.5, 0.5, 0.0, 0.0]
    state = r.state_dict()
    assert "expert_bias" in state and "tokens_per_expert" not in state
    # the accumulated counts come from training forwards only, and the update resets them
    r(torch.randn(10, 4), seq_len=10)
    assert r.tokens_per_expert.sum() == 10
    r.eval()
    r(torch.randn(10, 4), seq_len=10)
    assert r.tokens_per_expert.sum() == 10
    r.update_bias()
    assert r.tokens_per_expert.sum() == 0


def test_bias_off_keeps_bias_zero():
    r = TopKRouter(4, 4, 1, bias_update_speed=0.0)
    r.update_bias(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert torch.all(r.expert_bias == 0)


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_router_logits_match_float64(device, dtype, seed):
    """16-bit tokens and weights give fp32 logits as exact as an fp32 GEMM of the upcast operands (on CUDA: one GEMM
    with an fp32 output); the gradients are within 16-bit rounding of the float64 ones."""
    from lightning_moe.moe.router import router_logits

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 256, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(24, 256, generator=g) * 0.05).to(device, dtype).requires_grad_()
    grad = torch.randn(300, 24, generator=g).to(device)
    logits = router_logits(x, w)
    assert logits.dtype == torch.float32
    logits.backward(grad)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x64 @ w64.T
    ref.backward(grad.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(logits, ref) < 1e-6  # exact products, fp32 accumulation
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert rel(x.grad, x64.grad) < 1e-2
    assert rel(w.grad, w64.grad) < 1e-2


def test_fp32_router_logits_are_plain_linear(seed):
    from lightning_moe.moe.router import router_logits

    x, w = torch.randn(10, 8), torch.randn(4, 8)
    torch.testing.assert_close(router_logits(x, w), x @ w.T)
    # mixed dtypes fall back to upcasting both
    assert router_logits(x.bfloat16(), w).dtype == torch.float32


@pytest.mark.parametrize("k", [1, 6, 16])
def test_compiled_top_k_is_torch_topk(seed, k):
    """Under torch.compile the selection is K rounds of argmax: the same experts in the same order as torch.topk,
    also where masked experts (group-limited routing) hold -inf."""
    from lightning_moe.moe.router import top_k_indices

    choice = torch.randn(65, 32)
    choice[::3, 8:24] = float("-inf")  # 16 experts left on every third row: enough for k <= 16
    compiled = torch.compile(top_k_indices, fullgraph=True)(choice, k)
    assert torch.equal(compiled, torch.topk(choice, k, dim=-1).indices)
    assert torch.equal(top_k_indices(choice, k), compiled)


def test_compiled_16bit_router_matches_eager(seed):
    """The compiled router (argmax top-k, summed-comparison counts, the unfused gradient GEMM of the tokens) gives
    eager mode's choices, weights, load counts and gradients; the tokens' gradient also takes a second term, as in
    the MoE layer, where Inductor would otherwise fuse it into the GEMM."""
    from torch._inductor.utils import run_and_get_code

    t, d, e, k = 96, 32, 16, 4
    x = torch.randn(t, d).to(torch.bfloat16)
    other = torch.randn(t, d).to(torch.bfloat16)
    g = torch.randn(t, k)
    results = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        r = TopKRouter(d, e, k, aux_loss_coef=0.01).to(torch.bfloat16)
        xi = x.clone().requires_grad_()

        def step(xi, r=r):
            out = r(xi, seq_len=t)
            loss = (out.weights * g).sum() + out.aux_loss + (xi.float() * other.float()).sum()
            return out.expert_indices, out.weights, loss

        fn = torch.compile(step) if compile_it else step

        def run(fn=fn, xi=xi):
            idx, w, loss = fn(xi)
            loss.backward()
            return idx, w

        if compile_it:
            (idx, w), code = run_and_get_code(run)
            # The tokens' gradient GEMM stays apart from the other gradient term (no addmm copying it).
            assert code and not any("addmm" in c for c in code)
        else:
            idx, w = run()
        results.append((idx, w.detach(), xi.grad, r.gate.weight.grad, r.tokens_per_expert.clone()))
    (idx0, w0, gx0, gw0, load0), (idx1, w1, gx1, gw1, load1) = results
    assert torch.equal(idx0, idx1) and torch.equal(load0, load1)
    torch.testing.assert_close(w1, w0)
    torch.testing.assert_close(gx1, gx0, atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(gw1, gw0, atol=1e-2, rtol=1.6e-2)
