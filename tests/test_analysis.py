"""Stability analysis: matrix-free spectral norms and eigenvalues against dense Jacobians on a block of every family,
Haber & Ruthotto's linear ODEs, perturbation growth of identity and scaled networks, block discovery, bad input."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from odenet_timm.models.hamiltonian import HamiltonianUnit
from odenet_timm.analysis import (
    AnalysisInputError, Block, block_map, block_states, find_blocks, forward_euler, leading_eigenvalues, perturbation_growth,
    random_perturbation, scheme_of, spectral_norm, theta_method,
)

_TIGHT_SOLVER = dict(solver_tol=1e-12, backward_tol=1e-12, solver_max_iter=300, backward_max_iter=300)


def _hamiltonian_unit(x):
    """One Hamiltonian unit (h = 1, weights drawn large enough to move eigenvalues off the unit circle) on the
    channel halves of ``x``."""
    unit = HamiltonianUnit(x.shape[1] // 2, h=1.0).double().eval()
    for name, p in unit.named_parameters():
        nn.init.normal_(p, 0, 0.5) if name.endswith('weight') else nn.init.uniform_(p, -0.5, 0.5)
    return Block('unit', unit, unit.f, unit.g), x.chunk(2, dim=1)


def _model_block(make, index):
    def block_and_state(x):
        model = make().double().eval()
        blocks = find_blocks(model)
        return blocks[index], block_states(model, blocks, x)[index][0]
    return block_and_state


_FAMILIES = {
    'inresnet': (_model_block(lambda: timm.create_model('inresnet_20', layers=(2, 1, 1), widths=(2, 2, 2)), 1), 3),
    'resnet': (_model_block(lambda: timm.create_model('cifar_resnet_20', layers=(2, 1, 1), widths=(2, 2, 2)), 1), 3),
    'hamiltonian': (_hamiltonian_unit, 4),
    'implicit': (_model_block(lambda: timm.create_model(
        'implicit_trapezoid_resnet', steps=(2, 1, 1), widths=(2, 2, 2), **_TIGHT_SOLVER), 1), 3),
}


def _block_at_data_point(family):
    """A square block of ``family`` (the second block of the first stage) at its input for two random images."""
    make, channels = _FAMILIES[family]
    block, state = make(torch.randn(2, channels, 4, 4, dtype=torch.float64))
    f, fx = block_map(block, state)
    return block, state, f, fx


def _dense_jacobian(f, x):
    return torch.autograd.functional.jacobian(lambda z: f(z[None])[0], x)


@pytest.mark.parametrize('family', sorted(_FAMILIES))
def test_power_iteration_matches_the_dense_spectral_norm(family):
    _, _, f, fx = _block_at_data_point(family)
    est = spectral_norm(f, fx, tol=1e-7, max_iter=500, generator=torch.Generator().manual_seed(0))
    assert est.converged and est.residual.max() <= 1e-7
    for b in range(len(fx)):
        dense = torch.linalg.matrix_norm(_dense_jacobian(f, fx[b]), ord=2)
        assert abs(float(est.sigma[b] - dense)) / float(dense) <= 1e-4


def _match(found, reference):
    """Largest relative distance from each found eigenvalue to the nearest reference eigenvalue."""
    return max(np.min(np.abs(reference - z)) / np.abs(z) for z in found)


@pytest.mark.parametrize('family', sorted(_FAMILIES))
@pytest.mark.parametrize('which', ['LR', 'LM'])
def test_arnoldi_matches_the_dense_eigenvalues(family, which):
    _, _, f, fx = _block_at_data_point(family)
    dense = torch.linalg.eigvals(_dense_jacobian(f, fx[0])).numpy()
    key = -dense.real if which == 'LR' else -np.abs(dense)
    top = dense[np.argsort(key)][:2]
    est = leading_eigenvalues(f, fx[:1], k=2, which=which, tol=1e-10, ncv=20, max_iter=200)
    assert est.method == 'arnoldi' and est.converged and len(est.values) == 2
    # a conjugate pair ties in modulus (and a real part): either member may come second
    assert _match(est.values, np.concatenate([top, top.conj()])) <= 1e-4
    assert _match(top[:1], est.values) <= 1e-4


def test_block_discovery_follows_the_stages():
    model = timm.create_model('inresnet_20', layers=(2, 1, 1), widths=(2, 2, 2))
    assert [b.name for b in find_blocks(model)] == ['stages.0.0', 'stages.0.1', 'stages.1.0', 'stages.2.0']
    ham = find_blocks(timm.create_model('hamiltonian_74', layers=(2, 1, 1), widths=(4, 4, 4)))  # units run as their couplings: observed at the first and the last one
    assert [b.name for b in ham] == ['stages.0.0', 'stages.0.1', 'stages.1.0', 'stages.2.0']
    assert ham[0].entry is ham[0].module.f and ham[0].exit is ham[0].module.g


def test_schemes_are_read_off_the_blocks():
    (block, state, _, _) = _block_at_data_point('inresnet')
    lam = float(block.module.interpolation.coefficient(None))
    scheme = scheme_of(block.module, state)
    assert scheme.amplification(np.array(0.5)) == pytest.approx(1 - lam + 0.5)
    assert scheme_of(_block_at_data_point('resnet')[0].module) == forward_euler()
    assert scheme_of(_block_at_data_point('implicit')[0].module) == theta_method(0.5)
    w = np.array([-3 + 2j, 1j, 0.5])
    assert np.allclose(theta_method(0.5).step_eigenvalue(theta_method(0.5).amplification(w)), w)
    assert list(theta_method(0.5).is_stable(w)) == [True, True, False]  # trapezoidal: the closed left half-plane


# -- Haber & Ruthotto's linear ODEs -------------------------------------------------------------------------------
K_PLUS, K_MINUS, K_ZERO = [[2., -2.], [0., 2.]], [[-2., 0.], [2., -2.]], [[0., -1.], [1., 0.]]


class _LinearStep(nn.Module):
    """``x ↦ x + h K x`` on ``(B, 2)`` states."""

    def __init__(self, K, h):
        super().__init__()
        self.register_buffer('K', torch.tensor(K, dtype=torch.float64))
        self.h = h

    def forward(self, x):
        return x + self.h * x @ self.K.T


class _Staged(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.stages = nn.Sequential(nn.Sequential(*blocks))

    def forward(self, x):
        return self.stages(x)


@pytest.mark.parametrize('K, expected', [(K_PLUS, [2, 2]), (K_MINUS, [-2, -2]), (K_ZERO, [1j, -1j])])
def test_linear_ode_eigenvalues_are_recovered_exactly(K, expected):
    x = torch.randn(1, 2, dtype=torch.float64)
    matrix = torch.tensor(K, dtype=torch.float64)
    est = leading_eigenvalues(lambda y: y @ matrix.T, x, k=2)
    assert est.method == 'dense'
    assert sorted(est.values, key=lambda z: (z.real, z.imag)) == sorted(expected, key=lambda z: (z.real, z.imag))
    h = 0.25  # a power of two: 1 + h·λ and back are exact in binary
    block_eigs = leading_eigenvalues(_LinearStep(K, h), x, k=2).values
    recovered = forward_euler().step_eigenvalue(block_eigs) / h
    assert sorted(recovered, key=lambda z: (z.real, z.imag)) == sorted(expected, key=lambda z: (z.real, z.imag))


def test_growth_of_identity_and_scaled_networks():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    delta = random_perturbation(x, 0.1, torch.Generator().manual_seed(1))
    assert float(delta.abs().max()) == pytest.approx(0.1)
    identity = perturbation_growth(_Staged([nn.Identity(), nn.Identity()]), x, delta)
    assert identity.blocks == ['stages.0.0', 'stages.0.1'] and torch.allclose(identity.ratios, torch.ones(5, 2, dtype=torch.float64))
    c = 1.7
    scaled = perturbation_growth(_Staged([_Scale(c), _Scale(c), _Scale(c)]), x, delta)
    assert torch.allclose(scaled.ratios, torch.tensor([c, c ** 2, c ** 3], dtype=torch.float64).expand(5, 3))
    assert scaled.largest() == pytest.approx(c ** 3)


class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def test_linear_ode_growth_grows_decays_and_is_preserved():
    x = torch.randn(4, 2, dtype=torch.float64)
    delta = random_perturbation(x, 1e-3, torch.Generator().manual_seed(0))
    last = {name: perturbation_growth(_Staged([_LinearStep(K, 0.1) for _ in range(10)]), x, delta).median()[-1]
            for name, K in (('plus', K_PLUS), ('minus', K_MINUS))}
    assert last['plus'] > 2 and last['minus'] < 0.5


# -- bad input ------------------------------------------------------------------------------------------------------
def test_a_model_without_blocks_is_refused():
    with pytest.raises(AnalysisInputError, match='cannot find the blocks of Linear'):
        find_blocks(nn.Linear(2, 2))


def test_an_ensemble_is_analysed_per_member():
    members = nn.ModuleList([timm.create_model('inresnet_20', layers=(1, 1, 1), widths=(2, 2, 2)) for _ in range(2)])
    with pytest.raises(AnalysisInputError, match='holds 2 staged networks'):
        find_blocks(members)


def test_zero_eps_is_refused():
    x = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(AnalysisInputError, match='ε must be positive, got 0'):
        random_perturbation(x, 0.0)
    with pytest.raises(AnalysisInputError, match=r'the perturbation is zero for 2 of 2 inputs \(ε = 0\?\)'):
        perturbation_growth(_Staged([nn.Identity()]), x, torch.zeros_like(x))


def test_eigenvalues_of_a_shape_changing_block_are_refused():
    with pytest.raises(AnalysisInputError, match=r'changes the state shape \(1, 2\) -> \(1, 3\)'):
        leading_eigenvalues(nn.Linear(2, 3).double(), torch.randn(1, 2, dtype=torch.float64))


# -- eval_robust.py --stability -------------------------------------------------------------------------------------
def test_the_stability_section_adds_columns_files_and_figures(tmp_path):
    from odenet_timm.robust.cli import main
    from odenet_timm.robust.leaderboard import SCHEMA_PATH
    from odenet_timm.robust.schema import load_schema, validate
    exports = []
    for name, arch in (('res', 'cifar_resnet_20'), ('inres', 'inresnet_20')):
        exports.append(str(tmp_path / name))
        timm.models.save_for_hf(timm.create_model(arch, layers=(2, 1, 1), widths=(2, 2, 2)).eval(), exports[-1],
                                safe_serialization=True)
    output = tmp_path / 'out'
    assert main(['--checkpoints', *exports, '--ensemble', f'ens={exports[0]},{exports[1]}', '--attacks', 'clean',
                 'pgd', '--steps', '2', '--n-examples', '4', '--blackbox-queries', '0', '--stability',
                 '--stability-examples', '3', '--output', str(output)]) == 0
    leaderboard = json.loads((output / 'leaderboard.json').read_text())
    assert validate(leaderboard, load_schema(SCHEMA_PATH)) == []
    analyses = json.loads((output / 'stability.json').read_text())['entries']
    records = {e['name']: e for e in leaderboard['entries']}
    for name in ('res', 'inres'):
        growth = analyses[name]['growth']['pgd']
        assert len(growth['median']) == 4 and analyses[name]['n_examples'] == 3
        assert records[name]['max_block_growth'] == pytest.approx(max(growth['median']), abs=1e-4)
        assert records[name]['lipschitz_median'] == pytest.approx(analyses[name]['lipschitz']['median'], abs=1e-4)
        assert [b['spectra'] is not None for b in analyses[name]['blocks']] == [False, True, False, False]
    assert len(analyses['inres']['interpolation_coefficients']) == 1 and analyses['res']['interpolation_coefficients'] is None
    assert records['ens']['max_block_growth'] == max(records['res']['max_block_growth'],
                                                     records['inres']['max_block_growth'])
    assert 'Lipschitz (median)' in (output / 'leaderboard.md').read_text()
    assert (output / 'leaderboard.csv').read_text().splitlines()[0].endswith('lipschitz_median,max_block_growth')
    for png in ('stability_growth.png', 'stability_spectra.png', 'stability_lambdas.png'):
        assert (output / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_stability_examples_must_be_positive(tmp_path, capsys):
    from odenet_timm.robust.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(['--model', 'inresnet_20', '--weights', str(tmp_path / 'w.safetensors'), '--stability',
              '--stability-examples', '0', '--output', str(tmp_path)])
    assert exit_info.value.code == 2
    assert '--stability-examples must be positive, got 0' in capsys.readouterr().err
