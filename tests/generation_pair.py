"""The tiny random GPT-2 that the generation tests run in transformers and in pyminigpt side by side."""

import torch

VOCAB = 97


def hf_and_gpt():
    """(transformers' GPT2LMHeadModel, pyminigpt's GPT with the same weights): 2 layers, 48 wide,
    bos 1, eos 2, weights drawn wide (initializer_range 0.3) so that the logits are far apart."""
    import transformers

    from pyminigpt import GPT

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=3,
                                     bos_token_id=1, eos_token_id=2, initializer_range=0.3)  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    return hf, GPT.from_hf(hf)


def left_padded_prompts():
    """Three left-padded prompts of lengths 7, 4 and 1 (pad id 0) and their attention mask."""
    mask = (torch.arange(7) >= 7 - torch.tensor([[7], [4], [1]])).long()
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 0)
    return ids, mask
