"""``robustness_curves.png``: accuracy against ε, one panel per white-box attack (and the per-example worst case),
one line per entry; clean accuracy is the point at ε = 0."""
from typing import Dict

__all__ = ['plot_robustness_curves']

_PANELS = (('fgsm', 'FGSM'), ('ifgsm', 'IFGSM (BIM)'), ('pgd', 'PGD'), ('autoattack', 'AutoAttack'),
           ('worst_case', 'worst case'))


def plot_robustness_curves(leaderboard: Dict, path: str) -> None:
    """Draw the curves of every entry of ``leaderboard`` (as built by ``build_leaderboard``) into ``path``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    entries = leaderboard['entries']
    panels = [(key, title) for key, title in _PANELS if any(e['curves'][key] is not None for e in entries)]
    if not panels:  # clean / noise only: one panel with the clean accuracies at ε = 0
        panels = [('clean', 'clean')]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (key, title) in zip(axes[0], panels):
        for e in entries:
            curve = e['curves'].get(key) or []
            points = sorted([(0.0, e['clean_acc'])] + [(x * 255, y) for x, y in zip(e['curves']['eps'], curve)])
            ax.plot(*zip(*points), marker='o', linestyle='--' if e['kind'] == 'ensemble' else '-',
                    label=e['name'] + (' ⚠' if e['unreliable'] else ''))
        ax.set_title(title)
        ax.set_xlabel('ε (× 1/255)')
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy (%) on {leaderboard['n_examples']} {leaderboard['dataset']} examples")
    # beside the last panel, not on it: the curves of robust models run along its top right
    axes[0][-1].legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
