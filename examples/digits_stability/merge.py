import json, sys, os
from odenet_timm.analysis.plots import plot_growth, plot_spectra, plot_interpolation_coefficients
models = {}
for m in sys.argv[1:]:
    p = f'runs/stab_{m}/stability.json'
    if os.path.exists(p):
        models.update(json.load(open(p))['entries'])
os.makedirs('runs/stab_all', exist_ok=True)
plot_growth(models, 'runs/stab_all/stability_growth.png')
plot_spectra(models, 'runs/stab_all/stability_spectra.png')
plot_interpolation_coefficients(models, 'runs/stab_all/stability_lambdas.png')
print('| model | median Lipschitz (input→logits) | residual max | converged | max block growth, PGD δ | max block growth, random δ | largest block ‖J‖₂ (median) | leading eigenvalue w (LR) of the analysed blocks | analysis seconds |')
print('|---|---:|---:|---|---:|---:|---:|---|---:|')
for name, a in models.items():
    lead = []
    for b in a['blocks']:
        if b['spectra']:
            w = b['spectra']['LR']['step_eigenvalues']
            lead.append(f"{b['name']}: {w[0][0]:+.2f}{w[0][1]:+.2f}i" if w else f"{b['name']}: –")
    print(f"| {name} | {a['lipschitz']['median']:.3g} | {a['lipschitz']['residual_max']:.1e} | {a['lipschitz']['converged']} ({a['lipschitz']['iterations']} it) | "
          f"{a['growth']['pgd']['largest']:.3g} | {a['growth']['random']['largest']:.3g} | {max(b['sigma_median'] for b in a['blocks']):.3g} | {'; '.join(lead)} | {a['seconds']} |")
    if a['interpolation_coefficients']:
        print('  λ:', [round(v, 3) for v in a['interpolation_coefficients']])
