"""benchmarks/bench_peers.py: its equality checks fail loudly, and the peer variants it builds compute what the
project computes (skipped when a peer library, an optional extra, is not installed)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from odenet_timm.layers.fixed_point import SolverConfig, SolverStatsLog
from odenet_timm.layers.reversible import AdditiveCoupling
from odenet_timm.models.implicit import ImplicitBlock

_DIR = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(_DIR))  # bench_peers imports its sibling bench_models
_spec = importlib.util.spec_from_file_location('bench_peers', _DIR / 'bench_peers.py')
bench_peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_peers)


def _fn():
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh())


def _unit_steps():
    """Two Hamiltonian-like units and a non-invertible step in between."""
    def halve(state):
        return tuple(nn.functional.avg_pool2d(t, 2) for t in state)
    return [AdditiveCoupling(_fn(), 0, 1, scale=0.3), AdditiveCoupling(_fn(), 1, 0, scale=-0.3), halve,
            AdditiveCoupling(_fn(), 0, 1), AdditiveCoupling(_fn(), 1, 0, scale=0.5)]


def test_check_fails_loudly_naming_the_row_and_the_variant():
    out = torch.ones(3)

    def plain():
        return out, [torch.ones(2)]

    def wrong_gradient():
        return out, [torch.tensor([1.0, 1.1])]
    log = []
    bench_peers.check_reversible('row', {'plain autograd': plain, 'project': plain}, 1e-6, log.append)
    assert len(log) == 2 and 'row / project: relative difference to plain autograd (output; all gradients) 0.0e+00' in log[1]
    with pytest.raises(SystemExit, match=r'row / peer: output or gradients differ from plain autograd \(7.1e-02 > 1e-06\)'):
        bench_peers.check_reversible('row', {'plain autograd': plain, 'peer': wrong_gradient}, 1e-6, log.append)


def test_peers_run_only_two_half_additive_couplings():
    with pytest.raises(ValueError, match='two-half additive couplings only'):
        bench_peers._segments([AdditiveCoupling(_fn(), 0, 1), AdditiveCoupling(_fn(), 1, 0, negate_target=True)])
    steps = _unit_steps()
    assert [kind for kind, _ in bench_peers._segments(steps)] == ['pairs', 'step', 'pairs']


@pytest.mark.parametrize('peer', ['memcnn', 'revlib'])
def test_reversible_peer_variants_equal_plain_autograd(peer):
    pytest.importorskip(peer)
    torch.manual_seed(0)
    steps = _unit_steps()
    params = [p for s in steps if isinstance(s, nn.Module) for p in s.parameters()]
    x_leaf = torch.randn(2, 4, 8, 8, requires_grad=True)
    weight = torch.randn(2, 4, 4, 4)
    results = []
    for kind in ('plain autograd', peer, bench_peers.PROJECT):
        for t in [x_leaf, *params]:
            t.grad = None
        out = bench_peers.reversible_runner(kind, steps)(x_leaf * 1.0)
        (out * weight).sum().backward()  # memcnn supports .backward() only
        results.append((out.detach(), [t.grad for t in [x_leaf, *params]]))
    (ref_out, ref_grads), *others = results
    for out, grads in others:
        assert bench_peers._rel(out, ref_out) < 1e-6
        assert max(bench_peers._rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5


def test_torchdeq_variant_equals_the_project_when_both_are_exact():
    pytest.importorskip('torchdeq')
    torch.manual_seed(0)
    config = SolverConfig(tol=1e-12, max_iter=200, backward_tol=1e-12, backward_max_iter=200)
    block = ImplicitBlock(3, 0.5, 1.0, 'linear', 6, 1.0, config, SolverStatsLog(), 'block').double().eval()
    block.residual.conv1.power_iterate_(50)
    block.residual.conv2.power_iterate_(50)
    model = nn.Sequential(block)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    weight = torch.randn_like(x)
    found = {}
    for kind in (bench_peers.PROJECT, 'torchdeq'):
        stats = {}
        step, _ = bench_peers.implicit_train_step(model, kind, 1e-12, stats, x, None, weight, torch.float64)
        found[kind] = step()
        if kind == 'torchdeq':
            assert stats['forward_iterations'] and stats['backward_iterations']  # its solver statistics are read
    (out_a, grads_a), (out_b, grads_b) = found.values()
    assert bench_peers._rel(out_b, out_a) < 1e-10
    assert max(bench_peers._rel(a, b) for a, b in zip(grads_b, grads_a)) < 1e-9
    assert 'forward' not in vars(block)  # the torchdeq variant restored the block's own forward


def test_a_tighter_torchdeq_row_says_whether_it_matched_the_projects_gradient_error():
    assert bench_peers.match_label(1.0e-5, 1.5e-5) == 'gradient error matched'
    assert bench_peers.match_label(1.5e-5, 1.5e-5) == 'gradient error matched'
    assert bench_peers.match_label(3.4e-4, 1.5e-5) == 'gradient error 3.4e-04, not matched: project 1.5e-05'


def test_peak_memory_does_not_depend_on_which_variant_is_measured_first():
    """Two variants sharing a parameter whose gradient each step replaces (as the peers share the modules) report
    the same peak whatever the order; the raw profiler figure charges the gradient freed at the start of a step
    only to the variant measured first."""
    shared = {'grad': torch.ones(2 ** 18)}

    def step():  # frees the previous gradient, a 1 MiB transient, a new 1 MiB gradient
        shared['grad'] = None
        transient = torch.ones(2 ** 18)
        shared['grad'] = transient * 2

    first, second = bench_peers.step_tensor_peak_mb(step, False), bench_peers.step_tensor_peak_mb(step, False)
    assert (first, second) == pytest.approx((2.0, 1.0), abs=1e-3)  # the bias the benchmark corrects
    shared['grad'] = torch.ones(2 ** 18)  # again left by an unprofiled step
    assert (bench_peers.peak_memory_mb(step, False), bench_peers.peak_memory_mb(step, False)) == pytest.approx(
        (1.0, 1.0), abs=1e-3)


def test_each_variant_is_timed_after_an_untimed_step_of_its_own_in_alternating_order(monkeypatch):
    """The heap a step leaves changes the next step's speed on CPU: every timed block follows an untimed step of the
    same variant, and the order of the variants is reversed every other round."""
    calls = []
    steps = {kind: (lambda kind=kind: calls.append(kind)) for kind in ('a', 'b', 'c')}
    monkeypatch.setattr(bench_peers, 'peak_memory_mb', lambda step, cuda: 1.0)
    times, cpu_times, memory = bench_peers.measure(steps, rounds=3, n_steps=2, sync=lambda: None, cuda=False)
    assert ''.join(calls) == 'aaabbbccc' + 'cccbbbaaa' + 'aaabbbccc'
    assert all(len(times[kind]) == len(cpu_times[kind]) == 3 for kind in steps) and memory == dict.fromkeys(steps, 1.0)
