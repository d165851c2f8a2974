"""The bridge to transformers: GPT-2 weights and configs both ways (convert.py), and
`patch_hf_gpt2`, which runs a transformers GPT-2 on pyminigpt's kernels (patch.py)."""

from .convert import (
    CONV1D_WEIGHTS,
    FIXED_HF_OPTIONS,
    HF_BUFFERS,
    config_from_hf,
    config_to_hf_dict,
    from_hf,
    from_pretrained,
    generation_config_dict,
    load_hf_state_dict,
    save_pretrained,
    state_dict_from_hf,
    state_dict_to_hf,
)
from .patch import patch_hf_gpt2, unpatch_hf_gpt2

__all__ = [
    "CONV1D_WEIGHTS",
    "FIXED_HF_OPTIONS",
    "HF_BUFFERS",
    "config_from_hf",
    "config_to_hf_dict",
    "from_hf",
    "from_pretrained",
    "generation_config_dict",
    "load_hf_state_dict",
    "patch_hf_gpt2",
    "save_pretrained",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "unpatch_hf_gpt2",
]
