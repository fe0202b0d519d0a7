"""Multi-token prediction: modules, loss, shared weights, and speculative decoding with MTP drafts."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_moe.errors import ConfigError
from lightning_moe.generate import generate, speculative_generate
from lightning_moe.models.config import ModelConfig
from lightning_moe.models.mtp import mtp_lambda, mtp_losses
from lightning_moe.models.transformer import MoETransformer
from lightning_moe.module import MoELanguageModel
from lightning_moe.moe.balance import moe_layers

V, D = 72, 32  # 72: no other weight dimension has this size


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, dim=D, n_layers=2, n_heads=2, dense_ffn_dim=48, num_experts=4, top_k=2,
                moe_ffn_dim=16, max_seq_len=96, mtp_depth=2)
    base.update(kw)
    return ModelConfig(**base)


def _build(cfg: ModelConfig, seed: int) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg)


def _markov_model_with_perfect_mtp(depth: int, moe: bool) -> MoETransformer:
    """A one-block model whose next token depends only on the current one, with MTP modules that copy it.

    Zero attention output makes position i's hidden state a function of token i alone. Embedding rows of +-1 have
    an RMS of exactly 1, so each MTP depth's embedding norm (eps 0) is the identity; its projection keeps the
    embedding and drops the hidden state, and its block and output norm are copies of the main ones. Depth k at
    position i then computes exactly what the main model computes at position i + k.
    """
    cfg = _cfg(n_layers=1, n_dense_layers=0 if moe else 1, mtp_depth=depth, mtp_moe=moe, norm_eps=0.0)
    model = MoETransformer(cfg)
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.randint(0, 2, (V, D)).float() * 2 - 1)
        model.layers["0"].attention.wo.weight.zero_()
        for layer in model.mtp.layers.values():
            layer.proj.weight.zero_()
            layer.proj.weight[:, :D] = torch.eye(D)  # [embedding ; hidden] -> embedding
            layer.block.load_state_dict(model.layers["0"].state_dict())
            layer.norm.load_state_dict(model.norm.state_dict())
    return model


def _assert_greedy_tokens(model: MoETransformer, got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal tokens. A CPU matmul's rounding depends on the number of rows, so a verify forward over a longer
    sequence may differ from greedy's by ~1e-6: a mismatch is only tolerated where greedy's top two logits tie
    to that precision (never seen in practice; this keeps the test free of rare false failures)."""
    assert got.shape == expected.shape
    if torch.equal(got, expected):
        return
    j = int((got != expected).nonzero()[0])
    with torch.no_grad():
        top2 = model.eval()(expected[None, :j])[0, -1].topk(2).values
    assert float(top2[0] - top2[1]) < 1e-4, f"token {j} differs from greedy: {got.tolist()} vs {expected.tolist()}"


# --- the model ---

def test_depth_zero_is_the_plain_model_and_mtp_weights_come_last(seed):
    plain = _build(_cfg(mtp_depth=0), seed)
    with_mtp = _build(_cfg(mtp_depth=2), seed)
    tokens = torch.randint(0, V, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    assert plain.mtp is None and plain(x, labels=y)[1] == []
    # Same seed: the main weights are drawn before the MTP modules, so both models start identical.
    main_keys = set(plain.state_dict())
    assert {k for k in with_mtp.state_dict() if not k.startswith("mtp.")} == main_keys
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(with_mtp.state_dict()[k], v, rtol=0, atol=0)
    logits, mtp_logits = with_mtp(x, labels=y)
    torch.testing.assert_close(logits, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(with_mtp(x), plain(x), rtol=0, atol=0)
    assert [t.shape for t in mtp_logits] == [(2, 15, V), (2, 14, V)]
    # Dropping the MTP modules leaves the plain inference model.
    with_mtp.mtp = None
    assert set(with_mtp.state_dict()) == main_keys
    plain.load_state_dict(with_mtp.state_dict(), strict=True)


def test_depth_zero_training_loss_is_the_plain_loss(seed):
    torch.manual_seed(seed)
    module = MoELanguageModel(_cfg(mtp_depth=0))
    module.configure_model()
    batch = torch.randint(0, V, (3, 21))
    with pytest.warns(UserWarning, match="self.log"):
        loss = module.training_step(batch, 0)
    expected = F.cross_entropy(module.model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_mtp_loss_matches_hand_computation(seed, attention):
    torch.manual_seed(seed)
    cfg = _cfg(mtp_depth=3, attention=attention, mtp_lambda=0.7)
    module = MoELanguageModel(cfg)
    module.configure_model()
    model = module.model
    window = torch.randint(0, V, (2, 13))  # tokens t[0..S], S = 12
    s = window.shape[1] - 1
    with torch.no_grad():
        h = model.blocks(model.tok_embeddings(window[:, :-1]))  # main hidden, before the final norm
        main_ce = F.cross_entropy(model.output(model.norm(h)).flatten(0, 1), window[:, 1:].flatten())
        per_depth = []
        for k in range(1, 4):
            layer, n = model.mtp.layers[str(k)], s - k  # depth k runs on positions 0..S-k-1
            emb = model.tok_embeddings(window[:, k:k + n])  # t[i+k]
            h = layer.block(layer.proj(torch.cat([layer.embed_norm(emb), layer.hidden_norm(h[:, :n])], -1)),
                            model.rope(n))
            logp = torch.log_softmax(model.output(layer.norm(h)), dim=-1)
            target = window[:, k + 1:k + 1 + n]  # t[i+k+1]
            per_depth.append(-logp.gather(-1, target[..., None]).mean())
        _, mtp_logits = model(window[:, :-1], labels=window[:, 1:])
        got = mtp_losses(mtp_logits, window[:, 1:])
        torch.testing.assert_close(torch.stack(got), torch.stack(per_depth), rtol=1e-5, atol=1e-6)
        with pytest.warns(UserWarning, match="self.log"):
            total = module.training_step(window, 0)
    torch.testing.assert_close(total, main_ce + 0.7 * torch.stack(per_depth).mean(), rtol=1e-5, atol=1e-6)


def test_depth_k_sees_tokens_up_to_i_plus_k_only(seed):
    """Changing token j changes depth k's logits from position j - k on (it embeds t[i+k]), none before."""
    model = MoETransformer(_cfg(mtp_depth=3)).eval()
    tokens = torch.randint(0, V, (2, 20))  # t[0..19]: inputs t[0..18], depth k positions 0..18-k
    j = int(torch.randint(3, 19, ()))
    other = tokens.clone()
    other[:, j] = (tokens[:, j] + 1) % V
    with torch.no_grad():
        _, before = model(tokens[:, :-1], labels=tokens[:, 1:])
        _, after = model(other[:, :-1], labels=other[:, 1:])
    for k in range(1, 4):
        torch.testing.assert_close(after[k - 1][:, :j - k], before[k - 1][:, :j - k], rtol=0, atol=1e-6)
        assert (after[k - 1][:, j - k] - before[k - 1][:, j - k]).abs().max() > 1e-3


def test_depth_k_predicts_k_plus_one_ahead(seed):
    """With MTP modules that copy a Markov model, depth k's logits at position i are the main logits at i + k."""
    torch.manual_seed(seed)
    model = _markov_model_with_perfect_mtp(depth=3, moe=False)
    tokens = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        logits, mtp_logits = model(tokens[:, :-1], labels=tokens[:, 1:])
    for k, depth_logits in enumerate(mtp_logits, start=1):
        torch.testing.assert_close(depth_logits, logits[:, k:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_mtp_gradients_reach_the_one_shared_embedding_and_head(seed, tie):
    torch.manual_seed(seed)
    model = MoETransformer(_cfg(tie_embeddings=tie))
    vocab_params = [n for n, p in model.named_parameters() if V in p.shape]
    assert vocab_params == (["tok_embeddings.weight"] if tie else ["tok_embeddings.weight", "output.weight"])
    assert not [k for k, v in model.state_dict().items() if k.startswith("mtp.") and V in v.shape]  # no copies
    tokens = torch.randint(0, V, (2, 16))
    _, mtp_logits = model(tokens[:, :-1], labels=tokens[:, 1:])
    torch.stack(mtp_losses(mtp_logits, tokens[:, 1:])).mean().backward()
    for name in vocab_params + ["layers.0.attention.wq.weight", "mtp.layers.2.proj.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The MTP loss trains the main trunk through h, but never the main model's final norm (MTP has its own).
    assert model.norm.weight.grad is None


@pytest.mark.parametrize("mtp_moe", [True, False])
def test_mtp_blocks_follow_mtp_moe_and_join_expert_balancing(mtp_moe):
    model = MoETransformer(_cfg(mtp_depth=2, mtp_moe=mtp_moe))
    keys = [key for key, _ in model.moe_layers()]
    assert keys == (["1", "mtp.1", "mtp.2"] if mtp_moe else ["1"])
    assert [m for _, m in model.moe_layers()] == [m for _, m in moe_layers(model)]  # same layers, same order


def test_lambda_schedule_and_config_errors():
    cfg = _cfg(mtp_lambda=0.3, mtp_lambda_final=0.1, mtp_lambda_switch_step=100)
    assert [mtp_lambda(cfg, s) for s in (0, 99, 100, 5000)] == [0.3, 0.3, 0.1, 0.1]
    assert mtp_lambda(_cfg(mtp_lambda=0.2), 10**6) == 0.2
    bad_values = [(dict(mtp_lambda=-1.0), "model.mtp_lambda="), (dict(mtp_lambda_final=-0.1), "mtp_lambda_final"),
                  (dict(mtp_depth=96), "model.mtp_depth"), (dict(mtp_lambda_switch_step=-1), "mtp_lambda_switch_step")]
    for bad, key in bad_values:
        with pytest.raises(ConfigError, match=key):
            _cfg(**bad)


def test_training_logs_main_and_mtp_losses(seed, tmp_path):
    torch.manual_seed(seed)
    module = MoELanguageModel(_cfg(mtp_depth=2, max_seq_len=16), {"warmup_steps": 1})
    data = DataLoader(torch.randint(0, V, (8, 17)), batch_size=4)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                         num_sanity_val_steps=0)
    trainer.fit(module, data, data)
    logged = trainer.callback_metrics
    assert {"train/loss", "train/mtp_loss", "train/mtp_loss_1", "train/mtp_loss_2", "train/mtp_lambda",
            "val/loss", "val/mtp_loss", "val/mtp_loss_2"} <= set(logged)
    mean = (logged["train/mtp_loss_1"] + logged["train/mtp_loss_2"]) / 2
    torch.testing.assert_close(logged["train/mtp_loss"], mean)


# --- decoding ---

@pytest.mark.parametrize("attention, mtp_moe", [("gqa", True), ("mla", False)])
def test_speculative_decoding_of_a_random_model_returns_greedy_tokens(seed, attention, mtp_moe):
    torch.manual_seed(seed)
    model = MoETransformer(_cfg(mtp_depth=3, attention=attention, mtp_moe=mtp_moe))
    prompt = torch.randint(0, V, (int(torch.randint(1, 8, ())),))
    expected = generate(model, prompt, 30)
    assert expected[:prompt.numel()].tolist() == prompt.tolist() and expected.numel() == prompt.numel() + 30
    tokens, stats = speculative_generate(model, prompt, 30)
    _assert_greedy_tokens(model, tokens, expected)
    assert 0.0 <= stats.acceptance_rate <= 1.0
    assert stats.new_tokens == 30 and 1 <= stats.steps <= 30 and stats.proposed > 0
    assert stats.accepted == sum(stats.accepted_per_depth) and stats.proposed == sum(stats.proposed_per_depth)


@pytest.mark.parametrize("moe", [False, True])
def test_speculative_decoding_with_perfect_drafts_accepts_them(seed, moe):
    torch.manual_seed(seed)
    model = _markov_model_with_perfect_mtp(depth=3, moe=moe)
    prompt = torch.randint(0, V, (4,))
    expected = generate(model, prompt, 40)
    tokens, stats = speculative_generate(model, prompt, 40)
    _assert_greedy_tokens(model, tokens, expected)
    assert stats.acceptance_rate > 0.9, stats
    assert stats.steps <= 12  # ~4 tokens per main forward instead of 1
    # Fewer drafting depths, and a generation length that ends mid-step.
    tokens, stats = speculative_generate(model, prompt, 7, num_draft=2)
    _assert_greedy_tokens(model, tokens, expected[:11])
    assert stats.proposed_per_depth[0] >= 1 and len(stats.proposed_per_depth) == 2


def test_decoding_edge_cases(seed):
    model = MoETransformer(_cfg(mtp_depth=2, max_seq_len=12))
    prompt = torch.randint(0, V, (5,))
    assert torch.equal(generate(model, prompt, 0), prompt)
    tokens, stats = speculative_generate(model, prompt[None], 0)
    assert torch.equal(tokens, prompt) and stats.steps == 0 and stats.acceptance_rate == 0.0
    tokens, stats = speculative_generate(model, prompt, 7)  # fills max_seq_len exactly
    _assert_greedy_tokens(model, tokens, generate(model, prompt, 7))
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="model.max_seq_len"):
        generate(model, prompt, 8)
    with pytest.raises(ValueError, match="mtp_depth"):
        speculative_generate(MoETransformer(_cfg(mtp_depth=0)), prompt, 3)
