"""Hamiltonian / MidPoint / Leapfrog networks: parameter counts against the paper, the adjoint, the update
formulas, exact inversion, memory-efficient gradients equal to plain autograd, BatchNorm statistics, input
gradients, autocast, DDP, grad checkpointing and the weight smoothness decay."""
import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from odenet_timm.layers.reversible import ReversibleSequenceFunction, flatten_steps
from odenet_timm.models.hamiltonian import (
    HamiltonianUnit, InceptionLayer, LeapfrogUnit, MidPointUnit, SymmetricLayer)
from model_checks import (
    assert_gradients_equal_plain_autograd, assert_unit_inverts_in_float64, memory_efficient_and_plain, num_params,
    saved_bytes, stage_reconstruction_error)


def _expected_params(layers, widths, block='hamiltonian', norm='bias', num_classes=10, layer='conv3x3'):
    """The arithmetic of docs/models.md#hamiltonian-midpoint-and-leapfrog-networks: a layer is K (9·c²; inception:
    1·g² + (1 + 9)·g² + (1 + 25)·g² with g = c/4) + b₁, b₂ (c each; 2c each for 'bn': BN affine); the network's
    first unit drops f's b₁ / BN₁; the first unit of stages 2, 3 runs at the old width; stem 3·w₀·9 + BN(w₀); head
    BN(C) + Linear(C → classes). Hamiltonian layers act on half the width."""
    per_norm = 2 if norm == 'bn' else 1

    def kernel(c):
        return 9 * c * c if layer == 'conv3x3' else 37 * (c // 4) ** 2

    def unit(width, first=False):
        if block == 'hamiltonian':
            c = width // 2
            return 2 * (kernel(c) + 2 * per_norm * c) - (per_norm * c if first else 0)
        return kernel(width) + per_norm * width  # F(Y) = Kᵀσ(N(KY)), no pre-norm

    total = 3 * widths[0] * 9 + 2 * widths[0]
    in_width = widths[0]
    for stage_idx, (depth, width) in enumerate(zip(layers, widths)):
        total += unit(in_width, first=stage_idx == 0) + (depth - 1) * unit(width)
        in_width = width
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


# A small instance of every variant: 2-3-2 units, widths 8-16-24 (transitions pad each half / entry).
SMALL = dict(layers=(2, 3, 2), widths=(8, 16, 24))
VARIANTS = [
    ('hamiltonian_218', dict(block_norm='bias')),
    ('hamiltonian_1202', dict(block_norm='bn')),
    ('midpoint_62', {}),
    ('leapfrog_62', {}),
    ('hamiltonian_inception_218', {}),
    ('midpoint_62', dict(layer='inception')),
]


# -- parameter counts ------------------------------------------------------------------------------------------
def test_parameter_counts_match_the_paper():
    assert num_params(timm.create_model('hamiltonian_74')) == 429_690
    assert num_params(timm.create_model('hamiltonian_218')) == 1_683_034
    assert num_params(timm.create_model('hamiltonian_1202')) == 9_699_338
    for name in ('midpoint_62', 'leapfrog_62'):  # paper 1.78M; full-width layout (module docstring)
        count = num_params(timm.create_model(name))
        assert count == 1_801_738 and abs(count - 1.78e6) / 1.78e6 < 0.02
    for name in ('midpoint_26', 'leapfrog_26'):
        assert num_params(timm.create_model(name)) == 535_258
    assert {'hamiltonian_reg_74', 'hamiltonian_reg_218', 'hamiltonian_inception_74',
            'hamiltonian_inception_218'} <= set(timm.list_models('hamiltonian_*'))
    # the report's variants: dropout adds no parameter; inception layers have 37·(c/4)² instead of 9·c² weights
    assert num_params(timm.create_model('hamiltonian_reg_74')) == 429_690
    assert num_params(timm.create_model('hamiltonian_reg_218')) == 1_683_034
    assert num_params(timm.create_model('hamiltonian_inception_74')) == 113_826
    assert num_params(timm.create_model('hamiltonian_inception_218')) == 440_122


@pytest.mark.parametrize('model_name, kwargs', [
    ('hamiltonian_218', dict(layers=(18, 18, 18), widths=(32, 64, 128))),
    ('hamiltonian_74', dict(layers=(6, 6, 6), widths=(32, 64, 112))),
    ('hamiltonian_218', dict(layers=(3, 1, 4), widths=(8, 16, 40), block_norm='bn', num_classes=7)),
    ('midpoint_62', dict(layers=(10, 10, 10), widths=(32, 64, 128))),
    ('leapfrog_26', dict(layers=(2, 5, 1), widths=(6, 10, 10), block_norm='bn', num_classes=3)),
    ('hamiltonian_inception_218', dict(layers=(18, 18, 18), widths=(32, 64, 128))),
    ('hamiltonian_inception_74', dict(layers=(2, 1, 3), widths=(8, 16, 40), block_norm='bn', num_classes=7)),
    ('midpoint_26', dict(layers=(2, 2, 2), widths=(8, 16, 24), layer='inception')),
])
def test_parameter_count_arithmetic(model_name, kwargs):
    model = timm.create_model(model_name, **kwargs)
    block = model.block
    expected = _expected_params(kwargs['layers'], kwargs['widths'], block, model.block_norm,
                                kwargs.get('num_classes', 10), model.layer)
    assert num_params(model) == expected


def test_defaults_and_bad_arguments():
    assert timm.create_model('hamiltonian_218').block_norm == 'bias'
    assert timm.create_model('hamiltonian_1202', layers=(1, 1, 1)).block_norm == 'bn'
    model = timm.create_model('hamiltonian_74', h=0.25, **SMALL)
    assert model.h == 0.25 and model.stages[0][0].f.scale == 0.25 and model.stages[0][0].g.scale == -0.25
    assert timm.create_model('leapfrog_26', h=0.5).stages[1][2].scale == -0.25
    assert timm.create_model('midpoint_26', h=0.5).stages[1][2].scale == 1.0
    with pytest.raises(ValueError, match='block_norm must be one of'):
        timm.create_model('hamiltonian_74', block_norm='ln')
    with pytest.raises(ValueError, match='step size h'):
        timm.create_model('hamiltonian_74', h=0)
    with pytest.raises(ValueError, match='block must be one of'):
        timm.create_model('hamiltonian_74', block='euler')
    with pytest.raises(ValueError, match='multiple of 4'):
        timm.create_model('hamiltonian_74', widths=(32, 64, 110))
    with pytest.raises(ValueError, match='one entry per stage'):
        timm.create_model('midpoint_26', layers=(2, 2))
    with pytest.raises(ValueError, match='layer must be one of'):
        timm.create_model('hamiltonian_74', layer='conv5x5')
    with pytest.raises(ValueError, match=r'must be a multiple of 4; got widths \(8, 12, 16\)'):
        timm.create_model('hamiltonian_inception_74', widths=(8, 12, 16))  # halves 4, 6, 8


# -- the layer, the units and their inverses -----------------------------------------------------------------
def test_transposed_convolution_is_the_true_adjoint():
    layer = SymmetricLayer(5).double()
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    y = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    lhs = (layer.conv(x) * y).sum()
    torch.testing.assert_close((x * layer.conv_transpose(y)).sum(), lhs, rtol=1e-12, atol=0)
    # the common port error (swapping the channels without flipping the kernel) is not the adjoint
    wrong = F.conv2d(y, layer.weight.transpose(0, 1), padding=1)
    assert abs((x * wrong).sum() - lhs) > 1e-3 * abs(lhs)


def test_inception_layer_is_the_sum_of_its_paths_and_its_transpose_the_true_adjoint():
    layer = InceptionLayer(8).double()  # groups of 2 channels
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    y = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    groups = x.chunk(4, dim=1)
    expected = torch.cat([
        groups[0],
        F.conv2d(groups[1], layer.weight_1x1),
        F.conv2d(F.conv2d(groups[2], layer.weight_3x3_reduce), layer.weight_3x3, padding=1),
        F.conv2d(F.conv2d(groups[3], layer.weight_5x5_reduce), layer.weight_5x5, padding=2),
    ], dim=1)
    torch.testing.assert_close(layer.conv(x), expected, rtol=1e-12, atol=1e-12)
    lhs = (layer.conv(x) * y).sum()
    torch.testing.assert_close((x * layer.conv_transpose(y)).sum(), lhs, rtol=1e-12, atol=0)
    with torch.no_grad():
        layer.norm1.bias.normal_()
        layer.norm2.bias.normal_()
    b1, b2 = layer.norm1.bias.view(1, -1, 1, 1), layer.norm2.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(
        layer(x), layer.conv_transpose(F.relu(layer.conv(x + b1) + b2)), rtol=1e-12, atol=1e-12)
    assert [tuple(k.shape) for k in layer.kernels()] == [(2, 2, 1, 1), (2, 2, 1, 1), (2, 2, 3, 3), (2, 2, 1, 1),
                                                         (2, 2, 5, 5)]


def test_layer_and_unit_formulas():
    torch.manual_seed(1)
    c, h = 3, 0.3
    x, y, z = (torch.randn(2, c, 6, 6, dtype=torch.float64) for _ in range(3))
    layer = SymmetricLayer(c, 'bias').double()
    with torch.no_grad():
        layer.norm1.bias.normal_()
        layer.norm2.bias.normal_()
    K, b1, b2 = layer.weight, layer.norm1.bias.view(1, -1, 1, 1), layer.norm2.bias.view(1, -1, 1, 1)
    expected = F.conv_transpose2d(F.relu(F.conv2d(x + b1, K, padding=1) + b2), K, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)

    unit = HamiltonianUnit(c, h).double()
    with torch.no_grad():
        new_y = y + h * unit.f.fn(z)
        new_z = z - h * unit.g.fn(new_y)  # Verlet: the NEW Y
        out = unit((y, z))
    torch.testing.assert_close(out[0], new_y, rtol=0, atol=1e-14)
    torch.testing.assert_close(out[1], new_z, rtol=0, atol=1e-14)
    assert isinstance(HamiltonianUnit(c, h, first=True).f.fn.norm1, torch.nn.Identity)

    with torch.no_grad():
        midpoint = MidPointUnit(c, h, parity=1).double()  # (Y_j, Y_{j-1}) → (Y_j, Y_{j+1})
        out = midpoint((x, y))
        torch.testing.assert_close(out[1], y + 2 * h * midpoint.fn(x), rtol=0, atol=1e-14)
        assert out[0] is x
        leapfrog = LeapfrogUnit(c, h, parity=0).double()
        torch.testing.assert_close(leapfrog((x, y))[0], 2 * y - x - h * h * leapfrog.fn(y), rtol=0, atol=1e-14)
        # a stage starts from Y_{-1} = Y_0: the first Leapfrog step is Y_0 − h² F(Y_0)
        torch.testing.assert_close(leapfrog((x, x))[0], x - h * h * leapfrog.fn(x), rtol=0, atol=1e-14)


def test_transition_pools_and_pads_each_entry_symmetrically():
    stage = timm.create_model('hamiltonian_74', **SMALL).stages[1]  # halves 4 → 8 channels
    assert stage[0].f.fn.weight.shape[0] == 4 and stage[1].f.fn.weight.shape[0] == 8  # old-width first unit
    y = torch.arange(4 * 4 * 4, dtype=torch.float32).view(1, 4, 4, 4)
    out = stage.transition((y, -y))
    assert [o.shape for o in out] == [(1, 8, 2, 2)] * 2
    torch.testing.assert_close(out[0][:, 2:6], F.avg_pool2d(y, 2))
    torch.testing.assert_close(out[1][:, 2:6], -F.avg_pool2d(y, 2))
    assert not out[0][:, :2].any() and not out[0][:, 6:].any()
    pair_stage = timm.create_model('leapfrog_26', **SMALL).stages[2]  # full width 16 → 24
    assert pair_stage.transition((torch.ones(1, 16, 4, 4),))[0][0, :, 0, 0].tolist() == [0] * 4 + [1] * 16 + [0] * 4


@pytest.mark.parametrize('make_unit', [
    lambda: HamiltonianUnit(4, 0.7, 'bias'),
    lambda: HamiltonianUnit(4, 0.7, 'bn'),
    lambda: MidPointUnit(4, 0.7, parity=1),
    lambda: LeapfrogUnit(4, 0.7, 'bn', parity=0),
    lambda: HamiltonianUnit(4, 0.7, 'bn', layer='inception'),
])
def test_each_unit_inverts_in_float64(make_unit):
    assert_unit_inverts_in_float64(make_unit())


@pytest.mark.parametrize('model_name', ['hamiltonian_218', 'hamiltonian_inception_218'])
def test_reconstruction_drift_across_a_full_stage_of_a_218_layer_network(model_name):
    model = timm.create_model(model_name)
    assert stage_reconstruction_error(model, torch.float64) < 1e-12
    assert stage_reconstruction_error(model, torch.float32) < 1e-5  # 18 units, 36 couplings


# -- memory-efficient mode against plain autograd ----------------------------------------------------------
@pytest.mark.parametrize('model_name, kwargs', VARIANTS)
def test_memory_efficient_gradients_equal_plain_autograd(model_name, kwargs):
    rev, plain = memory_efficient_and_plain(model_name, **SMALL, **kwargs)
    # Biases away from their zero init: an inception layer's identity group feeds its input straight into the
    # ReLU, and where that input is an exact 0 (the stem's ReLU) the kink's subgradient would be decided by
    # the rounding of the reconstruction (1e-17 instead of 0), not by the backward under test.
    with torch.no_grad():
        for name, p in rev.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, 0.1)
    plain.load_state_dict(rev.state_dict())
    assert_gradients_equal_plain_autograd(rev, plain, torch.randn(3, 3, 8, 8, dtype=torch.float64))


def test_batchnorm_statistics_after_one_train_step_are_identical():
    rev, plain = memory_efficient_and_plain('hamiltonian_1202', **SMALL)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    for model in (rev, plain):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    rev_state, plain_state = rev.state_dict(), plain.state_dict()
    buffers = [k for k in plain_state if 'running' in k or 'num_batches_tracked' in k]
    assert len(buffers) == 3 * (2 * 2 * (2 + 3 + 2) - 1 + 2)  # every BN of the units, stem and head
    for key in buffers:
        assert torch.equal(rev_state[key], plain_state[key]), key
        if key.endswith('num_batches_tracked'):
            assert rev_state[key].item() == 1
    for key in plain_state:
        torch.testing.assert_close(rev_state[key], plain_state[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('model_name', ['hamiltonian_1202', 'midpoint_62'])
def test_memory_efficient_backward_under_module_tracking_flop_counter(model_name):
    """FlopCounterMode tracks every module's input gradients; the reversible backward's recomputations run
    inside it. The gradients stay those of plain autograd, and the counted FLOPs show the price: one more forward
    of the units, less the last coupling of the last stage, whose graph from forward backward uses."""
    rev, plain = memory_efficient_and_plain(model_name, **SMALL)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    flops, grads = [], []
    for model in (plain, rev):
        with FlopCounterMode(display=False) as counter:
            model.train()(x).sum().backward()
        flops.append(counter.get_total_flops())
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(grads[1], grads[0]):
        assert (a - b).norm() <= 1e-8 * b.norm()
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        plain(x)
    counts = {name: sum(ops.values()) for name, ops in forward.get_flop_counts().items()}
    names = {id(m): f'HamiltonianNet.{name}' for name, m in plain.named_modules()}
    assert [stage.keep_last_graph for stage in rev.stages] == [False, False, True]
    not_recomputed = counts[names[id(flatten_steps(list(plain.stages[-1]))[-1].fn)]]
    assert not_recomputed > 0
    assert flops[1] == flops[0] + counts['HamiltonianNet.stages'] - not_recomputed


@pytest.mark.parametrize('model_name', ['hamiltonian_218', 'leapfrog_62'])
def test_input_gradient_with_autograd_grad_in_eval_mode(model_name):
    rev, plain = memory_efficient_and_plain(model_name, **SMALL)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for model in (plain, rev):
        inp = x.clone().requires_grad_()
        loss = F.cross_entropy(model.eval()(inp), torch.tensor([1, 2]))
        grads.append(torch.autograd.grad(loss, inp)[0])
        assert all(p.grad is None for p in model.parameters())
    assert (grads[1] - grads[0]).norm() <= 1e-8 * grads[0].norm()


@pytest.mark.parametrize('model_name', ['hamiltonian_218', 'hamiltonian_1202'])
def test_autocast_bfloat16_trains_in_memory_efficient_mode(model_name):
    """bfloat16 gradients differ from float32 ones anyway; the reversible backward (which recomputes under the
    forward's autocast state) must not add much to that error. (BatchNorm in bfloat16 on a tiny batch is
    noisy: 'bn' layers have the larger error, in both modes.)"""
    rev, plain = (m.float().train() for m in memory_efficient_and_plain(model_name, **SMALL))
    x = torch.randn(4, 3, 8, 8)

    def grads(model, autocast):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().mean()
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = grads(plain, autocast=False)
    plain_bf16, rev_bf16 = grads(plain, autocast=True), grads(rev, autocast=True)
    assert torch.isfinite(rev_bf16).all()
    bf16_error = (plain_bf16 - reference).norm() / reference.norm()
    assert 0 < bf16_error < 0.3
    assert (rev_bf16 - reference).norm() / reference.norm() < 2 * bf16_error


def test_no_reversible_graph_without_gradients(monkeypatch):
    calls = []
    apply = ReversibleSequenceFunction.apply
    monkeypatch.setattr(ReversibleSequenceFunction, 'apply', lambda *a: calls.append(1) or apply(*a))
    model = timm.create_model('hamiltonian_218', **SMALL).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    model.requires_grad_(False)
    model(x)  # eval, nothing requires grad
    assert calls == []
    model(x.requires_grad_())  # an attack: input gradients through every stage
    assert len(calls) == 3


def test_stored_activations_do_not_grow_with_depth():
    x = torch.randn(2, 3, 16, 16)
    shallow = timm.create_model('hamiltonian_218', layers=(2, 2, 2), widths=(8, 16, 24)).train()
    deep = timm.create_model('hamiltonian_218', layers=(6, 6, 6), widths=(8, 16, 24)).train()
    assert saved_bytes(deep, x) == saved_bytes(shallow, x)
    shallow_plain = timm.create_model('hamiltonian_218', layers=(2, 2, 2), widths=(8, 16, 24),
                                      memory_efficient=False).train()
    assert saved_bytes(shallow_plain, x) > 2 * saved_bytes(shallow, x)


def test_gradients_reach_every_parameter_once_under_ddp(tmp_path):
    """DDP's reducer hooks fire when a parameter's gradient is accumulated: in memory-efficient mode every
    parameter gets exactly one accumulation per backward, and DDP's gradients equal the plain ones."""
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1)
    try:
        rev, plain = memory_efficient_and_plain('hamiltonian_1202', **SMALL)
        ddp = DistributedDataParallel(rev.train())
        counts = {}
        for name, p in rev.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, name=name: counts.update({name: counts.get(name, 0) + 1}))
        x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
        for step in range(2):  # a missed hook would fail the second iteration ("finished reduction")
            ddp.zero_grad()
            ddp(x).square().sum().backward()
        assert counts == {name: 2 for name, _ in rev.named_parameters()}
        plain.train()(x).square().sum().backward()  # train-mode BN: batch statistics, same gradients
        for p_rev, p_plain in zip(rev.parameters(), plain.parameters()):
            torch.testing.assert_close(p_rev.grad, p_plain.grad, rtol=1e-8, atol=1e-12)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_grad_checkpointing_recomputes_whole_stages(memory_efficient):
    model = timm.create_model('leapfrog_62', memory_efficient=memory_efficient, **SMALL).double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- weight smoothness decay ---------------------------------------------------------------------------------
def test_smoothness_loss_and_its_gradient():
    model = timm.create_model('hamiltonian_74', layers=(3, 2, 2), widths=(8, 16, 24)).double()
    expected = 0.0
    for stage in model.stages:
        units = list(stage)[0 if stage.pad is None else 1:]  # the old-width unit has no same-shape neighbour
        for prev, nxt in zip(units[:-1], units[1:]):
            for name in ('f', 'g'):
                expected += 0.5 * (getattr(nxt, name).fn.weight - getattr(prev, name).fn.weight).square().sum()
    loss = model.smoothness_loss()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    k = [u.f.fn.weight for u in model.stages[0]]  # d/dK_1 = (K_1 - K_0) - (K_2 - K_1)
    torch.testing.assert_close(k[1].grad, (k[1] - k[0]) - (k[2] - k[1]), rtol=1e-12, atol=1e-14)

    with torch.no_grad():
        for stage in model.stages:
            for unit in list(stage)[0 if stage.pad is None else 1:]:
                for name in ('f', 'g'):
                    getattr(unit, name).fn.weight.copy_(getattr(stage[-1], name).fn.weight)
    assert model.smoothness_loss().item() == 0.0
    assert timm.create_model('midpoint_26', layers=(1, 1, 1)).smoothness_loss().item() == 0.0


# -- the regularized network: dropout before the classifier ---------------------------------------------------
def test_regularized_network_drops_the_pooled_features_and_keeps_plain_gradients():
    model = timm.create_model('hamiltonian_reg_218', **SMALL)
    assert model.drop_rate == 0.4 and isinstance(model.stem.norm, torch.nn.BatchNorm2d)  # BN after the stem conv
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        unpooled = model.eval().forward_features(x)
        features = model.forward_head(unpooled, pre_logits=True)
        dropped = model.train().forward_head(unpooled, pre_logits=True)
    kept = dropped != 0
    assert 0.5 < kept.float().mean() < 0.7  # dropout with p = 0.4 in training ...
    torch.testing.assert_close(dropped[kept], features[kept] / 0.6)  # ... scaled by 1 / (1 − p)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model(x))  # and none in evaluation

    rev, plain = memory_efficient_and_plain('hamiltonian_reg_218', **SMALL)
    inp = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    grads = []
    for net in (plain, rev):
        torch.manual_seed(5)  # the same dropout mask in both
        net.train()(inp).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(grads[1], grads[0]):
        assert (a - b).norm() <= 1e-8 * b.norm()
