"""Circuit discovery: edge patching against whole-run and node patching, EAP against exact edge patching, EAP-IG
against EAP and completeness, ACDC against a reference loop, faithfulness, node scores, and the planted induction
circuit."""

import math
from dataclasses import replace

import pytest
import torch

import lsi
from lsi.core.runs import Run
from lsi.errors import InputError, ShapeMismatchError, UnknownArchitectureError
from lsi.locate.circuit_graph import CircuitGraph, contrast, patched_metrics
from lsi.locate.circuits import (
    acdc,
    eap,
    eap_ig,
    faithfulness,
    faithfulness_curve,
    node_scores,
)
from lsi.locate.metrics import Metric, logit, logit_diff
from lsi.locate.result import LocateResult
from lsi.testing import tiny_model

pytestmark = pytest.mark.unit

SEQUENTIAL = [("llama", {}), ("gpt2", {}), ("qwen3", {}), ("phi3", {}), ("gpt_neox", {"use_parallel_residual": False})]


def _pair(seed: int = 0, rows: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 90, (rows, length), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(3, 90, (rows, 3), generator=gen)
    return clean, corrupt


def _edges_from(graph: CircuitGraph, sender: str) -> torch.Tensor:
    return graph.mask(e for e in graph.edges if e.startswith(sender + "->"))


def _max_diff(reference: torch.Tensor) -> Metric:
    """Largest |logit − reference logit| over every row, position and token."""
    return Metric("max_diff", lambda logits, batch: (logits - reference).abs().max())


def test_graph_counts_follow_gqa(tiny_lm) -> None:
    lm = tiny_lm("llama")  # 2 layers, 4 query heads sharing 2 KV heads
    graph = CircuitGraph.of(lm)
    n_layers, h, g = 2, 4, 2
    assert (graph.n_heads, graph.n_kv_heads) == (h, g)
    assert len(graph.senders) == 1 + n_layers * (h + 1)
    assert len(graph.receivers) == n_layers * (h + 2 * g + 1) + 1
    before = [1 + layer * (h + 1) for layer in range(n_layers)]  # senders written before each layer's attention
    expected = sum((h + 2 * g) * b + (b + h) for b in before) + len(graph.senders)
    assert len(graph.edges) == expected == 82
    assert "blocks.0.attn.head_out[3]->blocks.1.attn.k[1]" in graph.edges
    assert not any("attn.k[2]" in e or "attn.v[2]" in e for e in graph.edges)  # KV heads only go to 1
    assert "blocks.1.attn.head_out[0]->blocks.1.attn.q[1]" not in graph.edges  # same layer: no edge
    assert "blocks.1.attn.head_out[0]->blocks.1.mlp.out" in graph.edges


@pytest.mark.parametrize(("family", "overrides"), SEQUENTIAL)
def test_patching_no_edge_is_clean_and_every_edge_is_corrupted(family, overrides, tiny_lm) -> None:
    lm = tiny_lm(family, **overrides)
    graph = CircuitGraph.of(lm)
    clean, corrupt = _pair()
    clean_logits, corrupt_logits = lm.forward(clean), lm.forward(corrupt)
    con = contrast(lm, graph, clean, corrupt, logit(5))
    none, every = torch.zeros_like(graph.allowed), graph.allowed
    to_clean = patched_metrics(lm, graph, con, torch.stack([none, every]), _max_diff(clean_logits))
    to_corrupt = patched_metrics(lm, graph, con, every[None], _max_diff(corrupt_logits))
    assert to_clean[0] == 0.0  # bit-identical: nothing is touched
    assert to_clean[1] > 1e-2  # the corruption matters...
    assert to_corrupt[0] < 1e-5  # ...and patching every edge reproduces it


@pytest.mark.parametrize("node", ["embed", "blocks.0.attn.head_out[1]", "blocks.0.mlp.out",
                                  "blocks.1.attn.head_out[2]", "blocks.1.mlp.out"])
def test_patching_all_edges_out_of_a_node_equals_patching_the_node(node, tiny_lm) -> None:
    lm = tiny_lm("llama")
    graph = CircuitGraph.of(lm)
    clean, corrupt = _pair(1)
    source = lm.run_with_cache(corrupt, [node])
    with lm.intervene(lsi.Patch(node, source)):
        reference = lm.forward(clean)
    con = contrast(lm, graph, clean, corrupt, logit(5))
    diff = _max_diff(reference)
    assert patched_metrics(lm, graph, con, _edges_from(graph, node)[None], diff)[0] < 1e-5
    assert diff(lm.forward(clean), lm.to_batch(clean)) > 1e-3


@pytest.mark.parametrize(("family", "overrides"), [("gpt_neox", {}), ("gemma2", {}), ("olmo2", {})])
def test_parallel_and_post_norm_families_are_refused(family, overrides, tiny_lm) -> None:
    with pytest.raises(UnknownArchitectureError, match="circuit discovery needs sequential pre-norm"):
        CircuitGraph.of(tiny_lm(family, **overrides))


def test_a_spec_naming_the_wrong_pre_attention_norm_is_refused() -> None:
    from lsi.arch.families import LLAMA

    model = tiny_model("llama")
    with torch.no_grad():  # fresh norms are all one function; make the two of each layer differ
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(2.0)
    with pytest.raises(UnknownArchitectureError, match="pre_attn_norm whose output"):
        CircuitGraph.of(lsi.LanguageModel(model, spec=replace(LLAMA, pre_attn_norm="post_attention_layernorm")))
    with pytest.raises(UnknownArchitectureError, match="circuit discovery needs sequential pre-norm"):
        CircuitGraph.of(lsi.LanguageModel(model, spec=replace(LLAMA, pre_attn_norm=None)))
    assert len(CircuitGraph.of(lsi.LanguageModel(model)).norms) == 2


def test_eap_equals_exact_edge_patching_when_the_metric_is_linear_in_the_receiver() -> None:
    model = tiny_model("llama").double()
    model.model.norm = torch.nn.Identity()  # the logits are now linear in the final residual, and so is logit(5)
    lm = lsi.LanguageModel(model)
    graph = CircuitGraph.of(lm)
    clean, corrupt = _pair(2)
    metric = logit(5)
    scores = eap(lm, clean, corrupt, metric, graph=graph).as_dict()
    into_logits = [e for e in graph.edges if e.endswith("->logits")]
    con = contrast(lm, graph, clean, corrupt, metric)
    patched = patched_metrics(lm, graph, con, torch.stack([graph.mask([e]) for e in into_logits]), metric)
    f_clean = float(metric(lm.forward(clean), lm.to_batch(clean)))
    exact = f_clean - patched
    estimate = torch.tensor([scores[e] for e in into_logits], dtype=torch.float64)
    assert exact.abs().max() > 1e-5
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-11)  # scores are stored as float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eap_is_exact_edge_patching_to_first_order(family) -> None:
    """Every edge (q/k/v inputs through the norm, MLP inputs, logits): with a tiny corruption, EAP matches exact
    patching of each edge alone up to second-order terms."""
    lm = lsi.LanguageModel(tiny_model(family).double())
    graph = CircuitGraph.of(lm)
    clean, _ = _pair(3, rows=2, length=6)
    noise = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-5
    corrupted = Run(clean, lambda: lm.intervene(lsi.Add("embed", noise)))
    metric = logit_diff(5, 7)
    scores = eap(lm, clean, corrupted, metric, graph=graph).scores.double()
    con = contrast(lm, graph, clean, corrupted, metric)
    single = graph.to_matrix(torch.eye(len(graph.edges), dtype=torch.bool))
    exact = float(metric(lm.forward(clean), lm.to_batch(clean))) - patched_metrics(lm, graph, con, single, metric)
    assert (scores - exact).abs().max() < 2e-3 * exact.abs().max()


def test_eap_ig_with_one_step_is_eap_and_completeness_improves_with_steps(tiny_lm) -> None:
    lm = tiny_lm("llama")
    clean, corrupt = _pair(4)
    metric = logit_diff(5, 7)
    plain = eap(lm, clean, corrupt, metric)
    one = eap_ig(lm, clean, corrupt, metric, steps=1)
    torch.testing.assert_close(one.scores, plain.scores, rtol=0, atol=0)

    def gap(result: LocateResult) -> float:
        c = result.settings["completeness"]
        return abs(c["embed_edges_sum"] - c["f_clean_minus_f_corrupt"])

    many = eap_ig(lm, clean, corrupt, metric, steps=32, batch_size=20)  # 6 steps per forward, 6 forwards
    assert many.settings["steps"] == 32
    assert gap(many) < 0.02 * abs(many.settings["completeness"]["f_clean_minus_f_corrupt"])
    assert gap(many) < gap(one) / 5


def _reference_acdc(lm, graph, con, metric, tau: float) -> torch.Tensor:
    removed = torch.zeros_like(graph.allowed)
    current = float(patched_metrics(lm, graph, con, removed[None], metric)[0])
    receivers = list(range(len(graph.receivers)))[::-1]
    for r in receivers:
        for s in sorted(graph.allowed[r].nonzero().flatten().tolist(), reverse=True):
            trial = removed.clone()
            trial[r, s] = True
            value = float(patched_metrics(lm, graph, con, trial[None], metric)[0])
            if abs(value - current) < tau:
                removed, current = trial, value
    return removed


def test_acdc_prunes_like_the_reference_loop(tiny_lm) -> None:
    lm = tiny_lm("llama")
    graph = CircuitGraph.of(lm)
    clean, corrupt = _pair(5)
    metric = logit_diff(5, 7)
    result = acdc(lm, clean, corrupt, metric, threshold=0.05, relative=True, graph=graph)
    tau = result.settings["threshold"]
    con = contrast(lm, graph, clean, corrupt, metric)
    reference = _reference_acdc(lm, graph, con, metric, tau)
    kept = set(result.select(threshold=tau, by="abs"))
    assert kept == {e for e, r in zip(graph.edges, reference[graph.allowed].tolist(), strict=True) if not r}
    assert 0 < result.settings["kept"] == len(kept) < len(graph.edges)
    f_circuit = faithfulness(lm, clean, corrupt, metric, kept, graph=graph)
    f_clean, f_corrupt = result.settings["f_clean"], result.settings["f_corrupt"]
    assert f_circuit == pytest.approx((result.settings["f_circuit"] - f_corrupt) / (f_clean - f_corrupt), abs=1e-5)


def test_acdc_with_a_huge_threshold_removes_everything(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    clean, corrupt = _pair(6, rows=2, length=4)
    result = acdc(lm, clean, corrupt, logit(5), threshold=1e9)
    assert result.settings["kept"] == 0
    assert result.settings["f_circuit"] == pytest.approx(result.settings["f_corrupt"], abs=1e-5)


def test_faithfulness_of_full_and_empty_circuits_and_the_curve(tiny_lm) -> None:
    lm = tiny_lm("llama")
    graph = CircuitGraph.of(lm)
    clean, corrupt = _pair(7)
    metric = logit_diff(5, 7)
    assert faithfulness(lm, clean, corrupt, metric, graph.edges, graph=graph) == pytest.approx(1.0)
    assert faithfulness(lm, clean, corrupt, metric, [], graph=graph) == pytest.approx(0.0, abs=1e-6)
    edges = eap_ig(lm, clean, corrupt, metric, steps=4, graph=graph)
    curve = faithfulness_curve(lm, clean, corrupt, metric, edges, graph=graph, fractions=(0.01, 0.1, 0.5, 1.0),
                               batch_size=6)
    assert curve.sizes == (1, 9, 41, 82)  # ceil(fraction * 82)
    assert curve.values[-1] == pytest.approx(1.0)
    circuit = edges.select(k=9)
    assert curve.values[1] == pytest.approx(faithfulness(lm, clean, corrupt, metric, circuit, graph=graph), abs=1e-5)
    flat = type(curve)(curve.fractions, curve.sizes, (0.5,) * 4, curve.f_full, curve.f_empty, "signed")
    assert flat.area == pytest.approx(0.5)
    assert flat.area_from_one == pytest.approx(0.5)


def test_node_scores_sum_incident_edges_with_kv_heads_shared() -> None:
    labels = ["embed->blocks.0.attn.q[1]", "embed->blocks.0.attn.k[0]", "blocks.0.attn.head_out[2]->logits",
              "blocks.0.mlp.out->logits"]
    edges = LocateResult.over(labels, [1.0, -2.0, 4.0, -8.0], method="eap", axis="edge", n_layers=1, n_heads=4,
                              n_kv_heads=2)
    both = node_scores(edges).as_dict()
    assert both["embed"] == 3.0 and both["logits"] == 12.0 and both["blocks.0.mlp.out"] == 8.0
    assert both["blocks.0.attn.head_out[0]"] == 2.0  # the key of KV head 0 serves query heads 0 and 1
    assert both["blocks.0.attn.head_out[1]"] == 3.0
    assert both["blocks.0.attn.head_out[2]"] == 4.0 and both["blocks.0.attn.head_out[3]"] == 0.0
    assert node_scores(edges, direction="out").as_dict()["blocks.0.attn.head_out[0]"] == 0.0
    assert node_scores(edges, direction="in").as_dict()["embed"] == 0.0


def test_bad_inputs_get_typed_errors(tiny_lm) -> None:
    lm = tiny_lm("llama")
    graph = CircuitGraph.of(lm)
    clean, corrupt = _pair(8)
    with pytest.raises(ShapeMismatchError, match="same token length"):
        eap(lm, clean, corrupt[:, :5], logit(5), graph=graph)
    with pytest.raises(InputError, match="edge labels"):
        graph.mask(["embed->logits", "blocks.9.mlp.out->logits"])
    with pytest.raises(InputError, match="steps >= 1"):
        eap_ig(lm, clean, corrupt, logit(5), steps=0, graph=graph)
    with pytest.raises(InputError, match="edge scores"):
        node_scores(LocateResult.over(["a"], [1.0], method="x"))
    with pytest.raises(InputError, match="increasing fractions"):
        faithfulness_curve(lm, clean, corrupt, logit(5), eap(lm, clean, corrupt, logit(5), graph=graph),
                           fractions=(0.5, 0.1), graph=graph)


@pytest.mark.slow
def test_induction_circuit_is_recovered_and_faithful() -> None:
    from lsi.evaluation import ranking as grades
    from lsi.organisms.registry import get_organism, ground_truth, load_organism

    lm = load_organism("induction")
    task = get_organism("induction").locate_tasks(lm, ground_truth("induction"))[0]
    split = task.test

    def metric(logits, batch):
        return split.metric(logits)

    graph = CircuitGraph.of(lm)
    edges = eap_ig(lm, split.clean, split.corrupted, metric, steps=5, graph=graph)
    nodes = node_scores(edges).as_dict()
    scores = {u: nodes[u] for u in task.universe}
    assert grades.auroc_of(scores, set(task.planted)) >= 0.85
    assert grades.r_precision(scores, set(task.planted)) >= 0.7
    small = edges.select(k=math.ceil(0.1 * len(graph.edges)))  # 11 of 110 edges
    assert faithfulness(lm, split.clean, split.corrupted, metric, small, graph=graph) >= 0.8
