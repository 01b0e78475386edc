"""
The conversation as it goes on: each utterance encoded once, when it is said, and its vectors
kept; after every turn the next emotion of the target speaker from the cached vectors of at
most max_context utterances (what sample.py runs), what Eq. 10's attention weighs to reach it,
and which utterances of a pool a pre-trained model expects next (Eq. 11-13).
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
    def encode(self, texts, waves):
        """Utterances (a list of texts, of token ids, and of int16 waves, None for a modality the model
        does not use) -> {β: (n, d)}, as evaluation encodes them"""
        tokens = [self.tok.encode(t, self.max_tokens) if isinstance(t, str) else t for t in texts]
        batch = encoder_inputs(tokens if self.model.text else None, waves if self.model.audio else None,
                               grid=self.device.type == "cuda")
        return encoded(self.model, to_device(batch, self.device), self.device)

    def add(self, H):
        """One more utterance, as encode gave it ({β: (1, d)}): cached"""
        for beta, cache in self.cache.items():
            cache.append(H[beta][0])
        self.turns += 1

    def context(self):
        """-> the cached vectors {β: (L, d)}, ctx (1, L) indexing them in spoken order, its mask"""
        L = len(self.cache[self.model.streams[0]])
        ctx = torch.arange(L, device=self.device)[None]
        return {beta: torch.stack(list(cache)) for beta, cache in self.cache.items()}, ctx, torch.ones_like(ctx).bool()

    @torch.no_grad()
    def next_emotion(self):
        """The next emotion's probabilities (n_labels,), or None before turn 2"""
        if self.turns < 2:
            return None
        return self.model.next_emotion(*self.context()).softmax(-1)[0].cpu()

    @torch.no_grad()
    def attention(self):
        """Eq. 10's weights of the next utterance's target over the cached turns, {β: (L,)}, zero on the
        nearby two; None for a model without the distant context (w/o Dist) or before turn 3"""
        if self.turns < 3 or not self.model.config.distant:
            return None
        H, ctx, mask = self.context()
        return {beta: self.model.context[beta](H[beta][ctx], mask, weights=True)[1][0, -1].cpu()
                for beta in self.model.streams}

    @torch.no_grad()
    def expected(self, pool):
        """Eq. 11-13 before the sigmoid: how well each utterance of pool {β: (n, d)} fits as the next
        one -> {β: (n,)}; None before turn 2"""
        if self.turns < 2:
            return None
        P = self.model.interact(*self.context())
        return {beta: pool[beta] @ P[beta][0, -1] for beta in self.model.streams}
