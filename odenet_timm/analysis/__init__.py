"""Stability analysis of ODE-inspired networks: perturbation growth through depth, local Lipschitz estimates
(spectral norms of block and end-to-end Jacobians), leading Jacobian eigenvalues against the stability region of each
block's scheme, and the learned In-ResNet coefficients. Numerics only: blocks are found through timm's staged layout.
"""
from .blocks import (
    Block, GrowthCurve, block_map, block_states, find_blocks, flatten_state, perturbation_growth, random_perturbation,
    staged_network,
)
from .errors import AnalysisInputError
from .jacobian import EigenEstimate, Linearization, SpectralNormEstimate, leading_eigenvalues, spectral_norm
from .schemes import AMPLIFICATION, Scheme, forward_euler, interpolated_euler, scheme_of, theta_method
