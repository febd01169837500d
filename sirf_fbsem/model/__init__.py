"""FBSEM-Net: stages (OSEM sub-update + residual CNN + MAP-EM fusion), the unrolled network, model files."""
from .blockwise import apply_blockwise, check_block_shape, receptive_radius
from .fbsem import FBSEMNet, FBSEMStage, StageTerms, fbsem_fusion, inverse_softplus
from .io import ModelFileError, load_model, save_model
from .regularisers import RegulariserConfig, ResidualCNN, build_regulariser, intensity_scale

__all__ = [
    "FBSEMNet",
    "FBSEMStage",
    "StageTerms",
    "apply_blockwise",
    "check_block_shape",
    "receptive_radius",
    "fbsem_fusion",
    "inverse_softplus",
    "RegulariserConfig",
    "ResidualCNN",
    "build_regulariser",
    "intensity_scale",
    "save_model",
    "load_model",
    "ModelFileError",
]
