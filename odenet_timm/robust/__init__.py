"""Robustness evaluation (docs/protocol.md): attacks on [0, 1] images through a normalizing wrapper, ensembles attacked
as one model, trust checks for gradient masking, and the leaderboard (JSON / Markdown / CSV / PNG).

Models are reached only through timm. ``eval_robust.py`` is the command line; :func:`evaluate` and
:func:`build_leaderboard` are the library entry points.
"""
from .attacks import ATTACKS, DEFAULT_ATTACKS, WHITE_BOX_ATTACKS, AttackProtocol, adversarial_examples, parse_eps
from .entries import Ensemble, EvalEntry, NormalizedModel, load_export_dir, load_weights_file, make_ensemble
from .errors import EvaluationInputError
from .evaluator import EntryOutcome, evaluate, load_evaluation_examples
from .leaderboard import SCHEMA_PATH, build_leaderboard, write_csv, write_json, write_markdown
from .noise import NOISE_SEVERITIES, CifarCNoise, ComputedNoise, corrupt
from .plots import plot_robustness_curves
from .schema import load_schema, validate
from .trust import FLAGS, trust_flags
