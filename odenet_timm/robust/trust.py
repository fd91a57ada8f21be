"""Trust checks: signs that an entry's robustness numbers come from gradient masking rather than robustness.

Gradient masking is a known failure of ODE and implicit defences (Athalye et al. 2018, arXiv:1802.00420);
RobustBench marks such entries unreliable. Each flag is ``True`` (fired), ``False`` (checked, silent) or ``None``
(not checkable with the attacks that ran). Comparisons are strict: with N examples, one example is 100/N points.
"""
from typing import Dict, List, Optional, Sequence, Tuple

from .attacks import eps_label

__all__ = ['FLAGS', 'LARGE_EPS_MARGIN', 'trust_flags']

LARGE_EPS_MARGIN = 10.0  # points above chance that count as "far above chance" at ε = large_eps

FLAGS: Dict[str, str] = {
    'iterative_above_fgsm': 'an iterative attack (IFGSM or PGD) leaves more accuracy than single-step FGSM at some ε',
    'accuracy_rises_with_eps': 'accuracy under an attack is higher at a larger ε (clean accuracy counting as ε = 0)',
    'above_chance_at_large_eps': f'accuracy under PGD at ε = 0.5 is more than {LARGE_EPS_MARGIN:g} points above '
                                 f'chance (the largest class share), where every image can be turned into the same one',
    'autoattack_above_pgd': 'AutoAttack leaves more accuracy than PGD at some ε',
    'blackbox_beats_whitebox': 'the black-box Square attack breaks an example that survived every white-box attack '
                               '(it attacks a seeded random --blackbox-share of them, at the leaderboard ε, or at '
                               'every ε with --blackbox-all-eps)',
}
_CURVES = ('fgsm', 'ifgsm', 'pgd', 'autoattack', 'worst_case')


def _pairs_above(curves: Dict, eps: Sequence[float], high: str, low: str) -> List[str]:
    """Descriptions of the ε where curve ``high`` lies strictly above curve ``low``."""
    if curves.get(high) is None or curves.get(low) is None:
        return []
    return [f'{high} {h:.2f}% > {low} {l:.2f}% at ε={eps_label(e)}'
            for e, h, l in zip(eps, curves[high], curves[low]) if h > l]


def _blackbox_breaks(curves: Dict, eps: Sequence[float], n_examples: int, attacked: Sequence[int]) -> List[str]:
    """Descriptions of the ε where Square broke examples that survived every white-box attack. The black-box curve
    (one point per ε it ran at, the first ones) counts an example correct when it survived the white-box attacks
    and Square did not break it; ``attacked`` counts the survivors Square attacked at each of those ε."""
    def count(accuracy: float) -> int:
        return round(accuracy * n_examples / 100)

    return [f'Square broke {count(w) - count(b)} of the {a} it attacked among the {count(w)} examples that survived '
            f'every white-box attack at ε={eps_label(e)} (worst case {w:.2f}% → {b:.2f}%)'
            for e, w, b, a in zip(eps, curves['worst_case'], curves['blackbox'], attacked) if b < w]


def trust_flags(summary: Dict, chance_acc: float) -> Tuple[Dict[str, Optional[bool]], List[str]]:
    """The flags of one entry from its accuracy ``summary`` (``n_examples``, ``clean_acc``, ``curves`` with ``eps``
    and one list per attack, ``large_eps_acc``, ``blackbox_attacked``), and a sentence of evidence for each flag
    that fired."""
    curves, eps = summary['curves'], summary['curves']['eps']
    evidence: Dict[str, Optional[List[str]]] = {}

    if curves.get('fgsm') is not None and (curves.get('ifgsm') is not None or curves.get('pgd') is not None):
        evidence['iterative_above_fgsm'] = (_pairs_above(curves, eps, 'ifgsm', 'fgsm')
                                            + _pairs_above(curves, eps, 'pgd', 'fgsm'))
    else:
        evidence['iterative_above_fgsm'] = None

    rising = []
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    present = [name for name in _CURVES if curves.get(name) is not None]
    for name in present:
        points = [(0.0, summary['clean_acc'])] + [(eps[i], curves[name][i]) for i in order]
        rising += [f'{name} {a2:.2f}% at ε={eps_label(e2)} > {a1:.2f}% at ε={eps_label(e1)}'
                   for (e1, a1), (e2, a2) in zip(points, points[1:]) if a2 > a1]
    evidence['accuracy_rises_with_eps'] = rising if present else None

    large = summary.get('large_eps_acc')
    evidence['above_chance_at_large_eps'] = None if large is None else (
        [f'{large:.2f}% under PGD at ε={summary["large_eps"]:g}, chance {chance_acc:.2f}%']
        if large > chance_acc + LARGE_EPS_MARGIN else [])

    evidence['autoattack_above_pgd'] = (
        _pairs_above(curves, eps, 'autoattack', 'pgd')
        if curves.get('autoattack') is not None and curves.get('pgd') is not None else None)

    evidence['blackbox_beats_whitebox'] = (
        _blackbox_breaks(curves, eps, summary['n_examples'], summary['blackbox_attacked'])
        if curves.get('blackbox') is not None and curves.get('worst_case') is not None else None)

    flags = {name: None if evidence[name] is None else bool(evidence[name]) for name in FLAGS}
    details = [f'{name}: {"; ".join(evidence[name])}' for name in FLAGS if flags[name]]
    return flags, details
