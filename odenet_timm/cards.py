"""Model cards in Hugging Face format (front matter from ``huggingface_hub.ModelCardData``, ``library_name: timm``).

* :func:`architecture_card` / :func:`write_architecture_cards`: one card per registered architecture, generated from
  what the code already says — the family module's docstring (the update equation), the variant's docstring,
  the pretrained cfg (paper, normalisation, input size), the feature levels and the parameter count. Families added
  later get their cards from the same generator: ``python eval_robust.py --write-architecture-cards model_cards/``.
* :func:`checkpoint_card`: the card of one evaluated checkpoint, with ``EvalResult`` s for clean and robust accuracy
  taken from its leaderboard record (``eval_robust.py --cards``).
"""
import inspect
import os
import sys
from typing import Dict, Iterable, List, Optional

import timm
import torch.nn as nn
from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ['architecture_card', 'write_architecture_cards', 'checkpoint_card']

_TAGS = ['image-classification', 'timm', 'odenet_timm']
# Plain text, not links: a card is also published on the Hub, where paths of this repository do not resolve.
_DOCUMENTATION = ('The update equations, layouts, parameter counts, initialisation and numerics of every family, and the '
                  'training recipes, are written out in `docs/models.md` of the odenet_timm repository; the robustness '
                  'protocol (noise constants, attack settings, trust flags, leaderboard fields) in `docs/protocol.md`.')
_USAGE_IMPORTS = 'import odenet_timm  # registers the models with timm (timm has no plugin entry points)\nimport timm\n'


def _card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f'---\n{data.to_yaml()}\n---\n\n{body.rstrip()}\n')


def _paper_lines(paper_ids: str, paper_name: Optional[str]) -> List[str]:
    """The paper of the pretrained cfg by title and id, with an absolute link (cards are read on the Hub, where
    links relative to this repository do not resolve)."""
    lines = []
    for paper in filter(None, (p.strip() for p in (paper_ids or '').split(','))):
        link = f'https://arxiv.org/abs/{paper[len("arXiv:"):]}' if paper.lower().startswith('arxiv:') else None
        title = f'"{paper_name}", ' if paper_name else ''
        lines.append(f'- {title}{paper}' + (f' — {link}' if link else ''))
    return lines or ['- (none recorded in the pretrained cfg)']


def _layout_rows(model: nn.Module) -> List[str]:
    rows = ['| level | module | channels | reduction | blocks |', '|---:|---|---:|---:|---:|']
    for level, info in enumerate(getattr(model, 'feature_info', [])):
        module = model.get_submodule(info['module'])
        blocks = len(module) if isinstance(module, nn.Sequential) else '–'
        rows.append(f"| {level} | `{info['module']}` | {info['num_chs']} | {info['reduction']} | {blocks} |")
    return rows


def architecture_card(model_name: str) -> ModelCard:
    """The card of the registered architecture ``model_name`` (default configuration, 10-class head)."""
    entrypoint = timm.models.model_entrypoint(model_name)
    family_doc = inspect.getdoc(sys.modules[entrypoint.__module__]) or ''
    variant_doc = inspect.getdoc(entrypoint) or ''
    model = timm.create_model(model_name)
    cfg = model.pretrained_cfg
    params = sum(p.numel() for p in model.parameters())
    data = ModelCardData(library_name='timm', license=cfg.get('license'), pipeline_tag='image-classification',
                         tags=_TAGS, model_name=model_name)
    c, h, w = cfg['input_size']
    body = '\n'.join([
        f'# {model_name}', '',
        variant_doc, '',
        '## Family', '',
        family_doc, '',
        '## Layout', '',
        *_layout_rows(model), '',
        f'- parameters: {params:,} ({model.num_classes}-class head)',
        f'- input: {c}×{h}×{w}, NORMALIZED with mean {tuple(cfg["mean"])} and std {tuple(cfg["std"])} (like every '
        f'timm model; the robustness evaluation wraps the model so that attacks work on [0, 1] pixels)',
        f'- classifier: `{cfg.get("classifier")}`, first conv: `{cfg.get("first_conv")}`', '',
        '## Paper', '',
        *_paper_lines(cfg.get('paper_ids'), cfg.get('paper_name')), '',
        '## Documentation', '',
        _DOCUMENTATION, '',
        '## Usage', '',
        '```python',
        _USAGE_IMPORTS,
        f"model = timm.create_model('{model_name}', num_classes=10)  # takes normalized 32×32 input",
        f"trained = timm.create_model('local-dir:RUN/export', pretrained=True)  # weights saved by train.py",
        '```',
    ])
    return _card(data, body)


def write_architecture_cards(directory: str, model_names: Optional[Iterable[str]] = None) -> List[str]:
    """Write ``DIRECTORY/<model>.md`` for every architecture this package registers (or ``model_names``)."""
    import odenet_timm
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in (odenet_timm.list_models() if model_names is None else model_names):
        path = os.path.join(directory, f'{name}.md')
        architecture_card(name).save(path)
        paths.append(path)
    return paths


_METRIC_NAMES = {
    'clean_acc': 'clean accuracy',
    'noise_acc': 'accuracy under CIFAR-10-C noise (4 corruptions × 5 severities)',
    'fgsm_acc': 'FGSM accuracy',
    'ifgsm_acc': 'IFGSM (BIM-20) accuracy',
    'pgd_acc': 'PGD-20 accuracy',
    'autoattack_acc': 'AutoAttack accuracy',
    'worst_case_acc': 'worst-case accuracy over the white-box attacks',
}


def checkpoint_card(record: Dict, leaderboard: Dict) -> ModelCard:
    """The card of one evaluated model from its ``leaderboard.json`` record."""
    eps = record['eps_labels'][0]
    results = [
        EvalResult(
            task_type='image-classification', dataset_type=record['dataset'], dataset_name=record['dataset'],
            dataset_split='validation', metric_type='accuracy', metric_value=record[metric],
            metric_name=name if metric in ('clean_acc', 'noise_acc') else f'{name} (L∞ ε = {eps})',
            metric_config=metric,
        )
        for metric, name in _METRIC_NAMES.items() if record[metric] is not None
    ]
    data = ModelCardData(library_name='timm', pipeline_tag='image-classification', tags=[*_TAGS, 'robustness'],
                         model_name=record['name'], eval_results=results)
    fired = record['flag_details']
    rows = ['| metric | accuracy (%) |', '|---|---:|']
    rows += [f'| {r.metric_name} | {r.metric_value:.2f} |' for r in results]
    body = '\n'.join([
        f"# {record['name']}", '',
        f"`{record['architecture']}` ({record['params']:,} parameters), evaluated on the first {record['n_examples']} "
        f"validation examples of {record['dataset']} (seed {record['seed']}).", '',
        f"- checkpoint: `{record['checkpoint']['path']}`",
        f"- sha256: `{record['checkpoint']['sha256']}`", '',
        '## Robustness', '',
        *rows, '',
        ('**Trust checks fired — these robust accuracies are unreliable:**\n\n' + '\n'.join(f'- {d}' for d in fired)
         if fired else 'Trust checks: none fired (' + ', '.join(
             f'{name}: {"unchecked" if value is None else "silent"}' for name, value in record['flags'].items())
         + ').'), '',
        'Protocol: ' + '; '.join(f'{k}: {v}' for k, v in leaderboard['protocol']['libraries'].items()), '',
        '## Usage', '',
        '```python',
        _USAGE_IMPORTS,
        f"model = timm.create_model('local-dir:{record['checkpoint']['path']}', pretrained=True).eval()",
        "# the model takes NORMALIZED input: timm.data.resolve_model_data_config(model) has its mean/std",
        '```',
    ])
    return _card(data, body)
