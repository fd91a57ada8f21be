"""One checkpoint through the stability section (what eval_robust.py --stability runs per entry), for timing."""
import sys, time, json
import torch
from odenet_timm.robust.entries import load_export_dir
from odenet_timm.robust.evaluator import load_evaluation_examples
from odenet_timm.robust.attacks import AttackProtocol
from odenet_timm.analysis.report import StabilitySettings
from odenet_timm.analysis.section import add_stability_section
name, out = sys.argv[1], sys.argv[2]
entry = load_export_dir(f'runs/{name}/export', name)
images, labels, _ = load_evaluation_examples('digits', None, 64, entry.input_size)
protocol = AttackProtocol(attacks=('clean', 'pgd'), blackbox_queries=0)
import os; os.makedirs(out, exist_ok=True)
board = {'entries': [{'name': name}]}
t = time.perf_counter()
add_stability_section(board, [entry], images, labels, protocol, out, StabilitySettings(n_examples=64))
print(name, 'section seconds incl. PGD', round(time.perf_counter() - t, 1), board['entries'][0])
