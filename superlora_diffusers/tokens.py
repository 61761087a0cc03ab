"""Pivotal tuning: the identifier word's input embedding trains beside the shared factors.

DreamBooth binds a subject to a rare word ("sks"); with a tiny adapter the word's own embedding is the cheapest
place to put what the subject looks like (a CLIP embedding row: 768 numbers in SD 1.5), which diffusers' advanced
DreamBooth script trains as `--train_text_encoder_ti`. Here the trained part is an offset added to the word's
token embeddings, by a tuner layer around the text encoder's input embeddings (`tuner.Embedding`), where the input ids are the word's
ids. So the tokenizer and the embedding table stay untouched: the call-time scale, disabling and unloading work
exactly as for ΔW (scale 0 or unload is the base model bit for bit), and any word may serve, also one the
tokenizer splits into several ids (each gets its own offset).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SuperLoRAConfig


class TokenOffsets(nn.Module):
    """Trainable offsets (len(token_ids), token_dim) on the input embeddings of the config's token ids."""

    def __init__(self, config: SuperLoRAConfig) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(len(config.token_ids), config.token_dim))  # zero: the base at start
        self.register_buffer("ids", torch.tensor(config.token_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids: torch.Tensor, embeds: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """`embeds` (b, n, dim) of `input_ids` (b, n) with weight · offset added where an id is the token's."""
        hits = (input_ids[..., None] == self.ids.to(input_ids.device)).to(embeds.dtype)  # (b, n, k)
        return embeds + weight * (hits @ self.delta.to(embeds))  # follows the encoder's device and dtype


def token_ids_for(tokenizer, word: str) -> list[int]:
    """The ids `tokenizer` gives `word` on its own (no start/end tokens)."""
    return list(tokenizer(word, add_special_tokens=False).input_ids)
