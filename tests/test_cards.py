"""Model cards: one per registered architecture from one generator (committed in model_cards/ and kept current),
in Hugging Face format."""
import os

import timm
from huggingface_hub import ModelCard

import odenet_timm
from odenet_timm.cards import architecture_card, write_architecture_cards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_architecture_card_says_equation_layout_params_paper_and_usage():
    card = architecture_card('inresnet_20')
    assert card.data.library_name == 'timm' and card.data.license == 'apache-2.0'
    text = card.text
    assert 'x_{n+1} = f_n(x_n) + (1 - λ_n) x_n' in text  # the family's equation, from its module docstring
    assert 'In-ResNet-20' in text  # the variant's docstring
    params = sum(p.numel() for p in timm.create_model('inresnet_20').parameters())
    assert f'parameters: {params:,}' in text
    assert '| 1 | `stages.0` | 16 | 1 | 3 |' in text and '| 3 | `stages.2` | 64 | 4 | 3 |' in text
    assert 'https://arxiv.org/abs/2006.05749' in text
    usage = text.split('```python\n', 1)[1]
    assert usage.startswith('import odenet_timm') and "timm.create_model('inresnet_20'" in usage


def test_committed_cards_are_the_generator_output_for_every_registered_model(tmp_path):
    write_architecture_cards(str(tmp_path))
    expected = sorted(f'{name}.md' for name in odenet_timm.list_models())
    committed_dir = os.path.join(REPO, 'model_cards')
    hint = 'regenerate them: python eval_robust.py --write-architecture-cards model_cards/'
    assert sorted(os.listdir(tmp_path)) == expected
    assert sorted(f for f in os.listdir(committed_dir) if f.endswith('.md')) == expected, hint
    for name in expected:
        with open(os.path.join(committed_dir, name)) as f:
            assert f.read() == (tmp_path / name).read_text(), f'model_cards/{name} is stale: {hint}'
    assert ModelCard.load(tmp_path / 'cifar_resnet_110.md').data.model_name == 'cifar_resnet_110'
