import pytest
import torch

from lightning_moe.moe.permute import combine, expert_capacity, permute


def test_dropless_conserves_every_token(seed):
    t, k, e = 37, 3, 5
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    perm = permute(idx, e)
    assert perm.dropless and int(perm.counts.sum()) == t * k
    # every (token, k) slot appears exactly once, grouped by expert in ascending order
    assert sorted(perm.slot_order.tolist()) == list(range(t * k))
    experts_in_order = idx.flatten()[perm.slot_order]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])
    assert torch.equal(torch.bincount(perm.token_index, minlength=t), torch.full((t,), k))


def test_combine_is_the_weighted_sum(seed):
    t, k, e, d = 11, 2, 4, 6
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k)
    perm = permute(idx, e)
    per_expert = torch.randn(e, d)
    routed = per_expert[idx.flatten()[perm.slot_order]]  # expert e outputs per_expert[e] for any token
    out = combine(routed, perm, w)
    expected = (w.unsqueeze(-1) * per_expert[idx]).sum(1)
    torch.testing.assert_close(out, expected)


def test_capacity_drops_exactly_the_overflow(seed):
    t, k, e = 40, 2, 4
    # skewed routing: expert 0 is popular
    idx = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(e - 1)[:k - 1] + 1]) for _ in range(t)])
    cap = expert_capacity(t, k, e, 1.0)
    assert cap == 20
    perm = permute(idx, e, cap)
    full = torch.bincount(idx.flatten(), minlength=e)
    assert torch.equal(perm.counts, full.clamp(max=cap))
    # Expert 0 overflows by 20; another expert may overflow too (on about 3% of seeds one gets 21 or more of the 40).
    assert int(perm.dropped) == int((full - cap).clamp(min=0).sum()) >= int(full[0] - cap) == 20
    # the first `cap` tokens (in token order) of an overflowing expert are kept
    kept_tokens_e0 = perm.token_index[idx.flatten()[perm.slot_order] == 0]
    assert torch.equal(kept_tokens_e0, torch.arange(cap))
    # dropped slots contribute nothing to the combine
    d = 3
    routed = torch.ones(perm.token_index.numel(), d)
    out = combine(routed, perm, torch.ones(t, k))
    assert torch.equal(out[:cap, 0], torch.full((cap,), 2.0))
    # Each token gets its kept slots: a slot is kept iff it is among the first `cap` of its expert in token order
    # (tokens past `cap` lose their expert-0 slot, and their other slot too where that expert also overflowed).
    seen, kept = torch.zeros(e, dtype=torch.long), torch.zeros(t)
    for token in range(t):
        for expert in idx[token].tolist():
            kept[token] += float(seen[expert] < cap)
            seen[expert] += 1
    assert torch.equal(out[:, 0], kept)
    assert (kept[cap:] <= 1).all()


@pytest.mark.parametrize("fusible", [False, True], ids=["eager_bmm", "compile_form"])
def test_gather_and_combine_gradients_match_plain_autograd(seed, fusible, monkeypatch):
    """Both formulations of the gathers: index_select + bmm (eager) and the product-sum form used under compile."""
    from lightning_moe.moe import permute as permute_mod
    from lightning_moe.moe.permute import gather_tokens

    monkeypatch.setattr(permute_mod, "_fusible", lambda dtype: fusible)

    t, k, e, d = 13, 3, 5, 8
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    perm = permute(idx, e)
    x = torch.randn(t, d, requires_grad=True)
    w = torch.rand(t, k, requires_grad=True)
    proj = torch.randn(d, d)
    out = combine(torch.tanh(gather_tokens(x, perm) @ proj), perm, w)
    g = torch.randn_like(out)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    # plain autograd reference: index_select + explicit per-slot weighted sum
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows = torch.tanh(x2.index_select(0, perm.token_index) @ proj)
    per_slot = torch.zeros(t * k, d).index_copy(0, perm.slot_order, rows).view(t, k, d)
    ref = (w2.unsqueeze(-1) * per_slot).sum(1)
    torch.testing.assert_close(out, ref)
    rdx, rdw = torch.autograd.grad(ref, (x2, w2), g)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_gather_and_combine_match_reference(seed, dtype):
    """Under torch.compile (bf16: the fused product-sum path; fp32: index_select + bmm) outputs and gradients match a
    float64 reference within the dtype's tolerance, and so does eager mode."""
    from lightning_moe.moe.permute import gather_tokens, inverse_order

    t, k, e, d = 24, 3, 6, 16
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    perm = permute(idx, e)
    inverse = inverse_order(perm)
    # Inputs exactly representable in ``dtype``, so the float64 reference sees the same numbers and the error is
    # only the computation's (bf16: at most 1.2% over 320 seeds, eager and compiled).
    proj = torch.randn(d, d).to(dtype).float()

    def layer(x, w):
        return combine(torch.tanh(gather_tokens(x, perm, inverse) @ proj.to(x.dtype)), perm, w, inverse)

    x64, w64 = torch.randn(t, d).to(dtype).double(), torch.rand(t, k, dtype=torch.float64)
    g64 = torch.randn(t, d).to(dtype).double()
    bound = 1e-5 if dtype == torch.float32 else 3e-2  # max error relative to the tensor's largest entry

    def close(got, want):
        err = float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())
        assert err < bound, f"{dtype}: relative error {err:.2e}"
    ref_in = (x64.clone().requires_grad_(), w64.clone().requires_grad_())
    ref = layer(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, g64)
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        inputs = (x64.to(dtype).requires_grad_(), w64.float().requires_grad_())
        out = fn(*inputs)
        close(out, ref)
        grads = torch.autograd.grad(out, inputs, g64.to(dtype))
        for got, want in zip(grads, ref_grads, strict=True):
            close(got, want)


def test_unweighted_combine_sums_each_tokens_rows(seed):
    """combine(rows, perm, None): the plain sum (for rows the experts already weighted), gradients by gather."""
    t, k, e, d = 11, 3, 5, 4
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    perm = permute(idx, e)
    rows = torch.randn(t * k, d, requires_grad=True)
    ref = combine(rows, perm, torch.ones(t, k))
    g = torch.randn_like(ref)
    ref_grad = torch.autograd.grad(ref, rows, g)[0]
    # Eager, and compiled (where the backward copies the token gradients to their rows with a scatter).
    for fn in (combine, torch.compile(combine, fullgraph=True)):
        out = fn(rows, perm, None)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out, rows, g)[0], ref_grad)
    with pytest.raises(ValueError, match="dropless"):
        combine(rows[:5], permute(idx, e, capacity=1), None)


def test_compiled_rows_from_tokens_is_the_gather(seed):
    """Under torch.compile the routed rows are written by a scatter from the tokens: the same rows as the gather."""
    from lightning_moe.moe.permute import _rows_from_tokens, inverse_order

    t, k, e, d = 17, 4, 6, 5
    perm = permute(torch.stack([torch.randperm(e)[:k] for _ in range(t)]), e)
    x = torch.randn(t, d)
    compiled = torch.compile(_rows_from_tokens, fullgraph=True)(x, inverse_order(perm), perm.token_index)
    assert torch.equal(compiled, x.index_select(0, perm.token_index))


@pytest.mark.parametrize("experts", [5, 256, 300, 40000], ids=["uint8", "uint8_full", "int16", "int32"])
def test_sort_by_expert_is_the_stable_argsort_and_the_counts(seed, experts):
    """The narrow-key sort gives torch's stable argsort of the ids, and the binary-searched counts are bincount's."""
    from lightning_moe.moe.permute import sort_by_expert

    n = 3000
    flat = torch.randint(0, experts, (n,))
    flat[: n // 3] = torch.randint(0, min(experts, 4), (n // 3,))  # many equal ids: the order among them matters
    flat[-1] = experts - 1  # the largest id survives the narrowing
    order, counts = sort_by_expert(flat, experts)
    assert torch.equal(order, torch.argsort(flat, stable=True))
    assert counts.dtype == torch.int64 and torch.equal(counts, torch.bincount(flat, minlength=experts))


def test_compiled_count_per_expert_matches_eager(seed):
    """Under torch.compile the counts are a summed comparison; eager mode adds with scatter_add_: the same counts."""
    from lightning_moe.moe.permute import count_per_expert

    e = 7
    flat = torch.randint(0, e - 1, (500,))  # the last expert gets nothing
    compiled = torch.compile(count_per_expert, fullgraph=True)(flat, e)
    assert compiled.dtype == torch.int64
    assert torch.equal(compiled, count_per_expert(flat, e))
    assert torch.equal(compiled, torch.bincount(flat, minlength=e))
