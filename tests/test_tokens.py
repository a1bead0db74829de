"""The token layers ([T, D] sequences): shapes, costs (with attention's T² term), padding.

- Costs are FlopCounterMode's MACs, and equal the textbook formulas: 4·T·D² + 2·T²·D for
  `attention`, that plus 2·T·D·ffn for `transformer`, T·D·C·size² for `patches`.
- Padding: attention and `pool_tokens(mean)` on a padded batch give, at the real tokens,
  exactly what the same layers give on each sequence cut to its real tokens; batched
  equals one example at a time.
- Shape mistakes are E604 with a sentence naming the layer.
"""

from __future__ import annotations

import pytest
import torch

from d2graph.check import check_text
import d2graph
from d2graph import data
from d2graph.bench import bench
from d2graph.cost import measure
from d2graph.diagnostics import D2GraphError
from d2graph.executor import compile
from d2graph.fmt import format_source
from d2graph.layers import Pipeline, align_padding, build_layer, initialise

from .conftest import ROOT


def _args(name: str, **given) -> dict:
    from d2graph.layers import LAYERS

    schema = LAYERS.get(name).schema
    return schema.bind([], [(k, v, None, None) for k, v in given.items()])[0]


@pytest.mark.parametrize("tokens", [1, 16, 65])
@pytest.mark.parametrize("dim,heads", [(32, 4), (48, 3)])
def test_attention_cost_has_the_t_squared_term(tokens, dim, heads):
    m = measure("attention", _args("attention", heads=heads), (tokens, dim))
    assert m.shape == (tokens, dim)
    assert m.macs == 4 * tokens * dim * dim + 2 * tokens * tokens * dim
    assert m.params == 4 * dim * dim + 4 * dim  # q, k, v and output projections with biases


def test_transformer_cost_is_attention_plus_the_feed_forward():
    t, d, f = 17, 32, 96
    m = measure("transformer", _args("transformer", heads=4, ffn=f), (t, d))
    assert m.shape == (t, d)
    assert m.macs == 4 * t * d * d + 2 * t * t * d + 2 * t * d * f
    assert m.params == (4 * d * d + 4 * d) + (d * f + f + f * d + d) + 2 * 2 * d  # + two layer norms


def test_vision_layers_shapes_and_costs():
    patches = measure("patches", _args("patches", size=4, dim=24), (1, 32, 28))
    assert patches.shape == (8 * 7, 24)
    assert patches.macs == 8 * 7 * 24 * 1 * 4 * 4
    assert measure("class_token", {}, (56, 24)) == (( 57, 24), 0, 24)
    assert measure("positions", _args("positions"), (57, 24)) == ((57, 24), 0, 57 * 24)
    assert measure("positions", _args("positions", kind="sinusoidal"), (57, 24)) == ((57, 24), 0, 0)
    assert measure("layernorm", _args("layernorm"), (57, 24)) == ((57, 24), 0, 48)
    assert measure("pool_tokens", _args("pool_tokens", how="cls"), (57, 24)).shape == (24,)
    assert measure("pool_tokens", _args("pool_tokens"), (57, 24)).shape == (24,)


def test_sinusoidal_positions_are_the_published_table():
    module = build_layer("positions", _args("positions", kind="sinusoidal"), (10, 8))
    table = module(torch.zeros(1, 10, 8))[0]
    pos, i = 3, 2  # feature 2i is sin(pos / 10000^(2i/d)), feature 2i+1 its cos
    angle = pos / 10000 ** (2 * i / 8)
    torch.testing.assert_close(table[pos, 2 * i], torch.tensor(angle).sin())
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.tensor(angle).cos())
    assert not list(module.parameters())


GRAPH = """graph g {{
  input x [{shape}]
  output y
  node N = {pipeline}
  x -> N -> y
}}"""


@pytest.mark.parametrize("shape,pipeline,words", [
    ("1, 32, 32", "patches(4, 30), transformer(heads=4, ffn=8), pool_tokens, fc(2)", "divisible by 4, but it is 30"),
    ("1, 30, 32", "patches(4, 32), pool_tokens, fc(2)", "height and width divisible by 4"),
    ("1, 32, 32", "transformer(heads=4, ffn=8), fc(2)", "needs a sequence of tokens [tokens, width]"),
    ("1, 32, 32", "patches(4, 32), pool_tokens, pool_tokens, fc(2)", "needs a sequence of tokens"),
    ("1, 32, 32", "patches(4, 31), positions(sinusoidal), fc(2)", "even token width"),
    ("2, 4, 4", "layernorm, fc(2)", "needs [tokens, width] or [features]"),
])
def test_shape_mistakes_are_E604_in_the_users_words(shape, pipeline, words):
    with pytest.raises(D2GraphError) as e:
        check_text(GRAPH.format(shape=shape, pipeline=pipeline), "g.d2")
    [diag] = e.value.diagnostics
    assert diag.code == "E604" and words in diag.message, diag.message


# --- padding -----------------------------------------------------------------------------


def _padded_batch(lengths: list[int], tokens: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), tokens, dim, generator=g)
    padding = torch.arange(tokens)[None, :] >= torch.tensor(lengths)[:, None]
    return x, padding


@pytest.mark.parametrize("layer,args", [("attention", dict(heads=2)),
                                        ("transformer", dict(heads=2, ffn=16)),
                                        ("pool_tokens", dict(how="mean"))])
def test_padded_tokens_change_nothing_at_the_real_ones(layer, args):
    torch.manual_seed(0)
    tokens, dim, lengths = 7, 8, [7, 3, 1, 5]
    module = Pipeline(build_layer(layer, _args(layer, **args), (tokens, dim))).eval()
    x, padding = _padded_batch(lengths, tokens, dim)
    batched = module(x, padding)
    for b, n in enumerate(lengths):
        alone = module(x[b:b + 1, :n])  # the sequence cut to its real tokens: no mask needed
        got = batched[b:b + 1, :n] if batched.dim() == 3 else batched[b:b + 1]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        # batched equals one example at a time, padding and all
        torch.testing.assert_close(batched[b:b + 1], module(x[b:b + 1], padding[b:b + 1]), atol=1e-5, rtol=1e-5)
    # without the mask the padded rows do leak in: the comparison above can fail
    assert not torch.allclose(module(x)[1:2, :3] if batched.dim() == 3 else module(x)[1:2],
                              module(x[1:2, :3]), atol=1e-3)


@pytest.mark.parametrize("layer,args", [("attention", dict(heads=2)), ("transformer", dict(heads=2, ffn=16))])
def test_causal_attention_reads_no_later_token(layer, args):
    torch.manual_seed(0)
    tokens, dim = 6, 8
    causal = Pipeline(build_layer(layer, _args(layer, causal=True, **args), (tokens, dim))).eval()
    both = Pipeline(build_layer(layer, _args(layer, **args), (tokens, dim))).eval()
    both.load_state_dict(causal.state_dict())
    x = torch.randn(3, tokens, dim)
    changed = x.clone()
    changed[:, 4:] = torch.randn(3, tokens - 4, dim)  # tokens 4 and 5 only
    torch.testing.assert_close(causal(changed)[:, :4], causal(x)[:, :4])  # the first four never read them
    assert not torch.allclose(causal(changed)[:, 4:], causal(x)[:, 4:], atol=1e-3)
    assert not torch.allclose(both(changed)[:, :4], both(x)[:, :4], atol=1e-3)  # not causal: every token does
    # The cost is the same: the masked scores are computed.
    assert measure(layer, _args(layer, causal=True, **args), (tokens, dim)).macs == \
        measure(layer, _args(layer, **args), (tokens, dim)).macs
    # Padded tokens in front (every key of the first query masked) give finite outputs.
    padding = torch.tensor([[True, True, False, False, False, False]] * 3)
    assert torch.isfinite(causal(x, padding)).all()


def test_a_causal_transformer_is_written_in_the_file():
    source = BERT.read_text().replace("transformer(heads, ffn)", "transformer(heads, ffn, causal=true)")
    graph, diagnostics = d2graph.check(source)
    assert not diagnostics
    assert any(getattr(m, "causal", False) for m in compile(graph).modules())
    _, diagnostics = d2graph.check(source.replace("causal=true", "causal=3"))
    assert diagnostics  # not a bool


def test_a_class_token_in_front_is_never_padding():
    padding = torch.tensor([[False, True, True], [True, True, True]])
    assert align_padding(padding, 4).tolist() == [[False, False, True, True], [False, True, True, True]]
    # a row that is all padding attends over everything rather than over nothing (NaN)
    assert align_padding(padding, 3).tolist() == [[False, True, True], [False, False, False]]
    torch.manual_seed(0)
    module = Pipeline(build_layer("attention", _args("attention", heads=1), (3, 4))).eval()
    assert torch.isfinite(module(torch.randn(2, 3, 4), padding)).all()


def test_kaiming_initialisation_leaves_the_token_layers_at_torchs_defaults():
    torch.manual_seed(0)
    module = Pipeline(build_layer("patches", _args("patches", size=2, dim=8), (1, 4, 4)),
                      build_layer("transformer", _args("transformer", heads=2, ffn=16), (4, 8)),
                      build_layer("fc", _args("fc", features=3), (4, 8)))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(1)
    initialise(module, "kaiming")
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"2.weight", "2.bias"}, changed  # only the fc


# --- token inputs ------------------------------------------------------------------------

BERT = ROOT / "examples" / "bert_early_exit.d2"


def test_the_executor_hands_each_node_the_padding_of_its_own_examples():
    """Batched with mixed lengths, routed (forced exits) = each example alone; and the
    mask matters: the same weights without it give other scores."""
    graph = d2graph.load(BERT)
    torch.manual_seed(0)
    executor = compile(graph).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (6, 32), generator=g)
    lengths = torch.tensor([32, 20, 9, 1, 16, 27])
    ids = ids.masked_fill(torch.arange(32)[None, :] >= lengths[:, None], 0)
    forced = {"D1": torch.tensor([1, 0, 1, 1, 1, 0]), "D2": torch.tensor([1, 1, 0, 1, 0, 0]), "D3": 1}
    with torch.no_grad():
        batched = executor(ids, mode="force", actions=forced)
        for b in range(6):
            alone = executor(ids[b:b + 1], mode="force", actions={q: a if isinstance(a, int) else a[b:b + 1]
                                                                  for q, a in forced.items()})
            torch.testing.assert_close(batched.output[b:b + 1], alone.output, atol=1e-5, rtol=1e-5)
            assert int(batched.cost[b]) == int(alone.cost[0])
        # the same pass with the mask switched off differs on the padded examples only
        unmasked = executor(ids, mode="all", keep=["L1"])
        plain = executor.nodes["L1"](ids)  # no padding given: every token attended to
        index, l1 = unmasked.values["L1"]
        torch.testing.assert_close(l1[0], plain[0], atol=1e-5, rtol=1e-5)  # no padding in example 0
        assert not torch.allclose(l1[2], plain[2], atol=1e-3)


def test_token_ids_reach_only_an_embedding_and_the_data_must_match():
    graph = d2graph.load(BERT)
    assert graph.inputs[0].tokens and graph.inputs[0].out_shape == (32,)
    with pytest.raises(D2GraphError) as e:
        data.check_compatible(data.load("digits"), graph)
    assert e.value.diagnostics[0].code == "E905"
    vit = d2graph.load(ROOT / "examples" / "vit_early_exit.d2")
    with pytest.raises(D2GraphError) as e:
        data.check_compatible(data.load("negated_keywords", n=200, length=32), vit)
    [diag] = e.value.diagnostics
    assert diag.code == "E905"  # the shapes differ first
    flat = check_text("graph g { input x [32] output y node A = fc(4) x -> A -> y }")
    with pytest.raises(D2GraphError) as e:
        data.check_compatible(data.load("negated_keywords", n=200, length=32), flat)
    assert "takes real values but negated_keywords gives token ids" in e.value.diagnostics[0].message


def test_a_token_input_round_trips_through_the_formatter():
    text = "graph g {\n  input ids tokens [8]\n  output y\n  node A = embedding(10, 4), fc(2)\n  ids -> A -> y\n}\n"
    assert format_source(text) == text
    assert "input ids tokens [8]" in format_source(text.replace("tokens [8]", "tokens[8]"))


def test_negated_keywords_follows_its_recipe():
    s = data.load("negated_keywords", n=1200, seed=5)
    again = data.load("negated_keywords", n=1200, seed=5)
    x, y = s.train.tensors
    assert x.dtype == torch.int64 and torch.equal(x, again.train.tensors[0])
    assert not torch.equal(x, data.load("negated_keywords", n=1200, seed=6).train.tensors[0])
    lengths = torch.from_numpy(s.meta["train"]["length"])
    real = torch.arange(32)[None, :] < lengths[:, None]
    assert torch.equal(x != 0, real)  # padding exactly after each sentence's end
    assert (lengths >= 16).all() and (lengths <= 32).all()
    keyword = lambda c: (x >= 2 + 3 * c) & (x < 2 + 3 * (c + 1))  # noqa: E731
    negated = torch.cat([torch.zeros(len(x), 1, dtype=torch.bool), x[:, :-1] == 1], dim=1)
    counted = torch.stack([(keyword(c) & ~negated).sum(1) for c in range(4)], 1)
    raw = torch.stack([keyword(c).sum(1) for c in range(4)], 1)
    top = counted.topk(2, dim=1).values
    assert torch.equal(counted.argmax(1), y) and (top[:, 0] > top[:, 1]).all()  # the rule, without ties
    easy = torch.from_numpy(s.meta["train"]["easy"])
    assert 0.3 < easy.float().mean() < 0.5
    assert (raw.argmax(1)[~easy] != y[~easy]).all()  # counting words is wrong on every hard sentence
    assert (raw.argmax(1)[easy] == y[easy]).all()


def test_bench_feeds_a_token_input_ids_within_its_vocabulary():
    graph = d2graph.load(BERT)
    assert graph.vocab("ids") == 64
    rows = bench(graph, batch=4, rounds=1)
    assert [r["cost"] for r in rows[1:]] == sorted((r["cost"] for r in rows[1:]), reverse=True)
    assert rows[-1]["nodes"] == ("L1", "E1", "D1") and rows[-1]["cost"] == 327_680 + 128 + 6
