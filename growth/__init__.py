"""growth: a differentiable Fisher-Kolmogorov glioma growth model in JAX.

`growth.inverse` generates the training simulations of a learned inverse model (the
network itself is in `rtjax.inverse`). No Flax, no files.

Arrays and voxel spacing in, arrays out: no files, no patients. Units: mm, days,
D in mm^2/day, rho in 1/day, density c in [0, 1].
"""

from growth.anisotropic import (
    CUBE_OFFSETS,
    AnisotropicFKSimulator,
    CompactStencilDiffusion,
    SellingField,
    StencilDiffusion,
    selling_decomposition,
    selling_field,
    tensor_stencil,
)
from growth.diffusion import (
    AbstractDiffusion,
    FaceCoefficients,
    FaceDiffusion,
    diffusion_operator,
    face_coefficients,
    harmonic_mean,
    tissue_diffusivity,
)
from growth.grid import Grid, stability_limit, stable_time_step
from growth.imaging import soft_visible_masks, visible_masks
from growth.seed import GaussianSeed
from growth.solver import (
    AbstractFKSimulator,
    FKArgs,
    FKParams,
    FKSimulator,
    LogisticSplitEuler,
    check_time_step,
    default_substeps,
    fk_rhs,
    logistic_flow,
    solve_fk,
)
from growth.tensor import (
    TENSOR_COMPONENTS,
    TumourTensorFamily,
    components_to_matrix,
    dti_design_matrix,
    eigh_field,
    fit_tensor_dwi,
    fractional_anisotropy,
    matrix_to_components,
    mean_diffusivity,
    rotate_tensor,
    tensor_from_direction,
    tensor_from_eigen,
    tumour_tensor,
    tumour_tensor_family,
    westin_measures,
)

__all__ = [
    "AnisotropicFKSimulator",
    "CompactStencilDiffusion",
    "SellingField",
    "selling_field",
    "CUBE_OFFSETS",
    "StencilDiffusion",
    "selling_decomposition",
    "tensor_stencil",
    "Grid",
    "stability_limit",
    "stable_time_step",
    "AbstractDiffusion",
    "FaceDiffusion",
    "FaceCoefficients",
    "tissue_diffusivity",
    "harmonic_mean",
    "face_coefficients",
    "diffusion_operator",
    "GaussianSeed",
    "visible_masks",
    "soft_visible_masks",
    "FKParams",
    "FKArgs",
    "AbstractFKSimulator",
    "FKSimulator",
    "LogisticSplitEuler",
    "logistic_flow",
    "fk_rhs",
    "check_time_step",
    "solve_fk",
    "default_substeps",
    "TENSOR_COMPONENTS",
    "components_to_matrix",
    "matrix_to_components",
    "rotate_tensor",
    "eigh_field",
    "fractional_anisotropy",
    "mean_diffusivity",
    "tensor_from_direction",
    "tensor_from_eigen",
    "dti_design_matrix",
    "fit_tensor_dwi",
    "westin_measures",
    "tumour_tensor",
    "TumourTensorFamily",
    "tumour_tensor_family",
]
