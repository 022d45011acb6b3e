"""Positional schemes (issue 10): one table (config.positions_for) says which `position` settings each family
honours; validate() refuses the others naming the valid ones; every accepted one really feeds the model
a positional signal."""

from __future__ import annotations

import pytest
import torch

from llmlab.config import ARCHS, POSITIONS, ModelConfig, positions_for
from llmlab.errors import ConfigError
from llmlab.models import GPT, Bert, Seq2Seq, build_model

V = 50
SMALL = dict(vocab_size=V, block_size=32, n_layer=2, n_dec_layer=2, n_head=4, n_embd=32)


def _model(arch: str, position: str, **kw) -> torch.nn.Module:
    """A small random model with weights large enough to matter: embeddings of std 1 (the size of the
    sinusoids) and matrices of std 2/sqrt(fan_in), so attention is sharp and order effects are not lost in
    the near-uniform attention of a fresh initialisation."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, position=position, **{**SMALL, **kw})).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_()
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 2.0 / m.in_features ** 0.5)
    return model


def _permuted(ids: torch.Tensor) -> torch.Tensor:
    """The same tokens in another order, the last one kept in place (so only the order differs)."""
    perm = torch.cat([torch.randperm(ids.size(1) - 1, generator=torch.Generator().manual_seed(3)),
                      torch.tensor([ids.size(1) - 1])])
    assert not torch.equal(perm, torch.arange(ids.size(1)))
    return ids[:, perm]


def test_the_table_covers_every_arch_and_only_known_schemes():
    for arch in ARCHS:
        assert positions_for(arch) and set(positions_for(arch)) <= set(POSITIONS)
    assert positions_for("gpt") == ("learned", "rope", "sinusoidal")
    with pytest.raises(ConfigError, match="arch"):
        positions_for("rnn")


@pytest.mark.parametrize("n_layer", [1, 2])
@pytest.mark.parametrize("position", positions_for("gpt"))
def test_gpt_output_depends_on_token_order(position, n_layer):
    model = _model("gpt", position, n_layer=n_layer)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, out_perm = model(ids)[:, -1], model(_permuted(ids))[:, -1]
    assert (out - out_perm).abs().max() > 1e-2, position


def test_the_order_test_catches_a_gpt_without_positions():
    """The control: with the positional signal removed (the old bug: sinusoidal GPTs added nothing), a
    one-layer GPT's last output is the same for any order of the earlier tokens."""
    model = _model("gpt", "sinusoidal", n_layer=1)
    model.pe.zero_()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids)[:, -1] - model(_permuted(ids))[:, -1]).abs().max() < 1e-5


@pytest.mark.parametrize("position", positions_for("gpt"))
def test_gpt_kv_cache_and_left_padding_hold_for_every_scheme(position):
    model = _model("gpt", position)
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches()
        steps = torch.cat([model(ids[:, :4], caches=caches)] + [model(ids[:, t:t + 1], caches=caches)
                                                                for t in range(4, 10)], 1)
        # left padding: positions count real tokens only, so the padded row equals the unpadded one
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
        left = model(padded, attention_mask=mask)[:, 3:]
    assert (steps - full).abs().max() <= 1e-5
    assert (left - full).abs().max() <= 1e-5


def test_gpt_sinusoidal_positions_are_the_2017_table():
    from llmlab.blocks import sinusoidal_positions

    model = _model("gpt", "sinusoidal")
    assert model.wpe is None and model.pe is not None
    assert torch.equal(model.pe, sinusoidal_positions(SMALL["block_size"], SMALL["n_embd"]))
    assert "pe" not in model.state_dict()  # a fixed table, not a weight


@pytest.mark.parametrize("position", positions_for("bert"))
def test_bert_output_depends_on_token_order(position):
    model = _model("bert", position)
    assert isinstance(model, Bert)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids)[:, -1] - model(_permuted(ids))[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("position", positions_for("seq2seq"))
def test_seq2seq_output_depends_on_source_and_target_order(position):
    model = _model("seq2seq", position)
    assert isinstance(model, Seq2Seq)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(0, V, (2, 10), generator=g), torch.randint(0, V, (2, 8), generator=g)
    with torch.no_grad():
        out = model(src, tgt)[:, -1]
        assert (out - model(_permuted(src), tgt)[:, -1]).abs().max() > 1e-2  # the encoder sees order
        assert (out - model(src, _permuted(tgt))[:, -1]).abs().max() > 1e-2  # the decoder sees order


REFUSED = [(arch, pos) for arch in ARCHS for pos in POSITIONS if pos not in positions_for(arch)]


def test_some_settings_are_refused():
    assert ("bert", "rope") in REFUSED and ("seq2seq", "rope") in REFUSED


@pytest.mark.parametrize(("arch", "position"), REFUSED)
def test_refused_setting_names_the_valid_choices(arch, position):
    with pytest.raises(ConfigError) as e:
        ModelConfig(arch=arch, position=position, **SMALL)
    msg = str(e.value)
    assert f"position={position!r}" in msg and arch in msg and "\n" not in msg
    for valid in positions_for(arch):
        assert repr(valid) in msg


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_scheme_names_the_valid_choices(arch):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({"arch": arch, "position": "alibi"})
    assert all(repr(v) in str(e.value) for v in positions_for(arch))


def test_replace_into_a_refused_setting_is_refused():
    cfg = ModelConfig(arch="gpt", position="rope", **SMALL)
    with pytest.raises(ConfigError, match="'learned'"):
        cfg.replace(arch="bert")


def test_default_configs_of_every_family_still_build():
    for arch in ARCHS:
        model = build_model(ModelConfig(arch=arch, **SMALL))
        assert model.config.position == "learned"
    assert isinstance(_model("gpt", "learned"), GPT)
