"""
The conversation as it goes on: each utterance encoded once, when it is said, and its vectors
kept; after every turn the next emotion of the target speaker from the cached vectors of at
most max_context utterances (what sample.py runs).
"""
from collections import deque

import torch

from nanotcmp.data import encoder_inputs, to_device
from nanotcmp.evaluate import encoded


class Stream:
    """The conversation so far, as cached utterance vectors: one encoding per utterance, ever."""

    def __init__(self, model, tok, max_tokens, max_context, device):
        self.model, self.tok, self.max_tokens, self.device = model, tok, max_tokens, device
        self.cache = {beta: deque(maxlen=max_context) for beta in model.streams}  # β -> the last (d,) vectors
        self.turns = 0

    @torch.no_grad()
    def add(self, text, wave):
        """One more utterance -> the next emotion's probabilities (n_labels,), or None before turn 2"""
        batch = encoder_inputs([self.tok.encode(text, self.max_tokens)] if self.model.text else None,
                               [wave] if self.model.audio else None, grid=self.device.type == "cuda")
        H = encoded(self.model, to_device(batch, self.device), self.device)  # as evaluation encodes
        for beta, cache in self.cache.items():
            cache.append(H[beta][0])
        self.turns += 1
        if self.turns < 2:
            return None
        L = len(self.cache[self.model.streams[0]])
        ctx = torch.arange(L, device=self.device)[None]  # (1, L): the cached utterances, in order
        cached = {beta: torch.stack(list(cache)) for beta, cache in self.cache.items()}  # β -> (L, d)
        logits = self.model.next_emotion(cached, ctx, torch.ones_like(ctx, dtype=torch.bool))
        return logits.softmax(-1)[0].cpu()
