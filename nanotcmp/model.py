"""
The TCMP model, in the order the data flows (the paper's Figure 2, left to right):
  1. one attention function and one transformer layer, shared by both encoders
  2. Bert   — text encoder (Eq. 2), post-LN
  3. Hubert — audio encoder (Eq. 3), group-norm/post-LN or layer-norm/pre-LN
  4. TCMP — pooling (Eq. 4), fusion (Eq. 6), GRUs and attention over the context (Eq. 7-10),
     the pre-training losses (Eq. 11-21) and the emotion head (Eq. 22)
  5. loading real checkpoints: one explicit name map per encoder, every name and shape checked
A reader new to the paper may start at part 4, "TCMP": the encoders are BERT and HuBERT as published.

The words nanotcmp uses, each in one meaning:
  target utterance  the next utterance, never an input: its emotion is predicted (fine-tuning), or it
                    is searched for among candidates (pre-training)
  target speaker    who will say it: the speaker of the source
  source, response  the two utterances before it, u_{N-1} and u_N: the nearby context; the ones before
                    them are the distant context
  window position   pre-training cuts dialogues into windows; every position j >= 2 of a window holds a
                    target utterance, its context the window's utterances 0 .. j-1
  candidates        the true target utterance and k-1 noise utterances drawn from other dialogues
  stream β          t (text), a (audio) and m (the two fused, Eq. 6): each with its own context interaction
  T2T, A2A, M2M     target utterance searching in one stream: text to text, audio to audio, fused to fused
  intra, inter      the TUS losses within a modality (T2T and A2A, Eq. 14) and across them (M2M, Eq. 15)
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

# Set to False to run attention as the plain softmax(QK^T/sqrt(d))V formula (for teaching and
# checking); both give the same numbers within float rounding.
USE_SDPA = True

# -----------------------------------------------------------------------------
# shared transformer pieces

def attention(q, k, v, key_mask, dropout_p=0.0):
    # q, k, v: (B, nh, T, hs); key_mask: (B, T) bool, True where the key is a real position
    mask = key_mask[:, None, None, :]  # (B, 1, 1, T), broadcast over heads and queries
    if USE_SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    att = F.dropout(att, dropout_p)
    return att @ v  # (B, nh, T, hs)


class SelfAttention(nn.Module):
    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for f in (self.q, self.k, self.v))  # (B, nh, T, hs)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Layer(nn.Module):
    """One transformer layer. BERT and HuBERT-base put the LayerNorm after each residual
    addition (post-LN); HuBERT-large ("stable layer norm") puts it before each sub-block."""

    def __init__(self, dim, n_head, ffn_dim, eps, dropout, pre_ln):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = SelfAttention(dim, n_head, dropout)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def mlp(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as BERT and HuBERT

    def forward(self, x, mask):
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), mask))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        return self.ln2(x + self.mlp(x))

# -----------------------------------------------------------------------------
# BERT (Eq. 2)

@dataclass
class BertConfig:
    vocab_size: int = 30522
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    ffn_dim: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    dropout: float = 0.1


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_positions, c.dim)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.dim)
        self.emb_ln = nn.LayerNorm(c.dim, eps=c.eps)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Layer(c.dim, c.n_head, c.ffn_dim, c.eps, c.dropout, pre_ln=False)
                                    for _ in range(c.n_layer))
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask, check=True, n_layers=None):
        # input_ids: (B, T) long, attention_mask: (B, T) 1/True at real tokens -> (B, T, D)
        # check: validate the input values (a host-device sync on an accelerator); n_layers: run the
        # first n_layers layers only (None: all)
        B, T = input_ids.shape
        if check:
            check_ids(input_ids, self.config.vocab_size)
            empty = (attention_mask.sum(-1) == 0).nonzero()
            if len(empty):  # would attend over nothing: NaN
                raise ValueError(f"sequence {empty[0].item()} of the batch has no real token "
                                 "(attention_mask all 0)")
        if T > self.config.max_positions:
            raise ValueError(f"sequence of {T} tokens is longer than the model's "
                             f"{self.config.max_positions} positions")
        pos = torch.arange(T, device=input_ids.device)
        # every token is segment 0: nanotcmp encodes one utterance per sequence
        x = self.tok_emb(input_ids) + self.pos_emb(pos) + self.type_emb.weight[0]
        return self.layers_from(0, self.drop(self.emb_ln(x)), attention_mask, n_layers)

    def layers_from(self, first, x, attention_mask, n_layers=None):
        # layers first, first + 1, ... (n_layers of them, None: to the last) on x (B, T, D), the hidden
        # states after the layers before -> (B, T, D)
        mask = attention_mask.bool()
        for layer in self.layers[first:None if n_layers is None else first + n_layers]:
            x = layer(x, mask)
        return x

    @classmethod
    def from_pretrained(cls, path):
        return load_pretrained(cls, path, "bert", bert_config, bert_names, BERT_EXTRAS)


def check_ids(input_ids, vocab_size):
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if bad.numel():
        raise ValueError(f"token id {bad[0].item()} is outside the vocabulary (size {vocab_size})")

# -----------------------------------------------------------------------------
# HuBERT (Eq. 3)

@dataclass
class HubertConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    ffn_dim: int = 3072
    conv_dim: tuple = (512,) * 7
    conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_norm: str = "group"    # "group": GroupNorm after conv 0 (base); "layer": LayerNorm after every conv (large)
    pre_ln: bool = False        # True = "stable layer norm" encoder (large)
    feat_proj_ln: bool = True   # LayerNorm before the feature projection
    pos_kernel: int = 128
    pos_groups: int = 16
    eps: float = 1e-5
    dropout: float = 0.1
    normalize_wave: bool = False  # zero mean / unit variance per utterance (preprocessor_config.json)

    @property
    def receptive_field(self):  # samples that make the first frame: 400 for the standard stack
        field = 1
        for k, s in reversed(list(zip(self.conv_kernel, self.conv_stride))):
            field = (field - 1) * s + k
        return field


class MaskedGroupNorm(nn.Module):
    """GroupNorm with one group per channel, whose statistics are taken over the valid frames only.
    (The reference includes the padding, so a padded utterance gets other numbers than alone.)"""

    def __init__(self, channels, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, mask):
        # x: (B, C, T), mask: (B, T) bool. x is overwritten: it is a fresh conv output that autograd
        # does not need, and this keeps the layer's memory at the reference's two (B, C, T) buffers
        m = mask[:, None, :].to(x.dtype)  # (B, 1, T)
        n = m.sum(-1, keepdim=True)  # (B, 1, 1) valid frames
        mean = x.mul_(m).sum(-1, keepdim=True) / n  # (B, C, 1)
        x = x.sub_(mean).mul_(m)  # centred, zero at padded frames
        var = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / n  # (B, C, 1)
        return torch.addcmul(self.bias[:, None], x, self.weight[:, None] * torch.rsqrt(var + self.eps))


class ConvLayer(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride, bias, norm):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.kernel, self.stride, self.norm_kind = kernel, stride, norm
        # these norms keep torch's default eps whatever the config says, as HuBERT does
        self.norm = {"group": MaskedGroupNorm(c_out, 1e-5), "layer": nn.LayerNorm(c_out)}.get(norm)

    def forward(self, x, mask):
        # x: (B, C_in, S), mask: (B, S) -> (B, C_out, S'), (B, S')
        x = self.conv(x)
        lengths = (mask.sum(-1) - self.kernel) // self.stride + 1
        mask = torch.arange(x.size(-1), device=x.device) < lengths[:, None]
        if self.norm_kind == "group":
            x = self.norm(x, mask)
        elif self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x), mask


class PositionalConv(nn.Module):
    """Relative position information: a wide grouped convolution over the frames, whose weight is
    weight-normalised (w = g * v / ||v||, the norm taken per kernel tap), as in HuBERT."""

    def __init__(self, dim, kernel, groups):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * 0.02)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # x: (B, T, D) with zeros at padded frames -> (B, T, D)
        # w = g * v / ||v||, the norm over dims 0 and 1: the fused kernel torch's weight_norm
        # parametrization runs, ~6x faster than written out (which rounds differently, by ~1e-7)
        w = torch._weight_norm(self.weight_v, self.weight_g, 2)
        y = F.conv1d(x.transpose(1, 2), w, self.bias, padding=self.kernel // 2, groups=self.groups)
        y = y[:, :, :x.size(1)]  # an even kernel gives one frame too many
        return F.gelu(y).transpose(1, 2)


class Hubert(nn.Module):
    def __init__(self, config: HubertConfig):
        super().__init__()
        self.config = c = config
        if c.feat_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', not {c.feat_norm!r}")
        dims = (1,) + tuple(c.conv_dim)
        self.convs = nn.ModuleList(
            ConvLayer(dims[i], dims[i + 1], c.conv_kernel[i], c.conv_stride[i], c.conv_bias,
                      c.feat_norm if (c.feat_norm == "layer" or i == 0) else None)
            for i in range(len(c.conv_kernel)))
        self.proj_ln = nn.LayerNorm(dims[-1], eps=c.eps) if c.feat_proj_ln else nn.Identity()
        self.proj = nn.Linear(dims[-1], c.dim)
        self.pos_conv = PositionalConv(c.dim, c.pos_kernel, c.pos_groups)
        self.ln = nn.LayerNorm(c.dim, eps=c.eps)  # after the positional conv (post-LN) or after the last layer (pre-LN)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Layer(c.dim, c.n_head, c.ffn_dim, c.eps, c.dropout, c.pre_ln)
                                    for _ in range(c.n_layer))
        self.apply(init_weights)

    def forward(self, wave, wave_mask=None, check=True):
        # wave: (B, S) float at 16 kHz, wave_mask: (B, S) bool or None -> (B, T', D), (B, T')
        # check: validate the lengths (a host-device sync on an accelerator)
        if wave_mask is None:
            wave_mask = torch.ones_like(wave, dtype=torch.bool)
        wave_mask = wave_mask.bool()
        if check:
            shortest = int(wave_mask.sum(-1).min())
            if shortest < self.config.receptive_field:
                raise ValueError(f"a waveform of {shortest} samples is shorter than the encoder's receptive "
                                 f"field ({self.config.receptive_field} samples, "
                                 f"{self.config.receptive_field / 16:.0f} ms at 16 kHz)")
        if self.config.normalize_wave:
            wave = normalize(wave, wave_mask)
        x, mask = wave[:, None, :], wave_mask  # (B, 1, S)
        for conv in self.convs:
            x, mask = conv(x, mask)  # (B, C, T')
        x = self.proj(self.proj_ln(x.transpose(1, 2)))  # (B, T', D)
        x = x * mask[..., None]  # padded frames are zero before the positional conv, as for a lone utterance
        x = x + self.pos_conv(x)
        if not self.config.pre_ln:
            x = self.ln(x)
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, mask)
        if self.config.pre_ln:
            x = self.ln(x)
        return x, mask

    @classmethod
    def from_pretrained(cls, path):
        return load_pretrained(cls, path, "hubert", hubert_config, hubert_names, HUBERT_EXTRAS)


def normalize(wave, mask):
    # zero mean, unit variance over each utterance's valid samples; padding stays zero
    m = mask.to(wave.dtype)
    n = m.sum(-1, keepdim=True)
    mean = (wave * m).sum(-1, keepdim=True) / n
    var = (((wave - mean) * m) ** 2).sum(-1, keepdim=True) / n
    return (wave - mean) / torch.sqrt(var + 1e-7) * m


def init_weights(module):
    # BERT's initialisation: N(0, 0.02) for weights, zero biases
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)

# -----------------------------------------------------------------------------
# TCMP: utterance vectors (Eq. 4), fusion (Eq. 6), context interaction (Eq. 7-10), heads and losses

@dataclass
class TCMPConfig:
    d: int = 768                          # the model width
    n_labels: int = 3
    modalities: tuple = ("text", "audio")  # ("text",), ("audio",) or both
    distant: bool = True                  # False: the model sees only the nearby context (w/o Dist)
    tus: str = "both"                     # pre-training loss: "intra" (T2T, A2A), "inter" (M2M) or "both"
    tus_loss: str = "bce"                 # "bce" (the sound reading of Eq. 14-15) or "softmax" (authors' code)
    zeta: float = 0.5                     # Eq. 21
    eta: float = 0.5
    context_emotions: float = 0.0         # weight of the loss recognising each context utterance's emotion
    dropout: float = 0.1
    bert: dict = None                     # BertConfig / HubertConfig fields, None when the modality is off
    hubert: dict = None


def pool(x, mask):
    # Eq. 4: max + mean over the valid positions; x: (U, T, D), mask: (U, T) bool -> (U, D)
    m = mask[..., None]
    mean = (x * m).sum(1) / m.sum(1)
    return x.masked_fill(~m, float("-inf")).amax(1) + mean


class GRU(nn.Module):
    """A GRU written out: reset gate r, update gate z, candidate n (PyTorch's GRU equations and
    parameter layout, gates stacked r, z, n). Steps where mask is False keep the previous state."""

    def __init__(self, d_in, d):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(3 * d, d_in))
        self.weight_hh = nn.Parameter(torch.empty(3 * d, d))
        self.bias_ih = nn.Parameter(torch.empty(3 * d))
        self.bias_hh = nn.Parameter(torch.empty(3 * d))
        for p in self.parameters():
            nn.init.uniform_(p, -d ** -0.5, d ** -0.5)  # as PyTorch's GRU

    def cell(self, x_proj, h):
        # x_proj: (B, 3d) the input's share W_ih x + b_ih, already projected; h: (B, d) -> (B, d):
        # r = σ(x_r + W_hr h + b_hr), z = σ(x_z + W_hz h + b_hz), n = tanh(x_n + r ⊙ (W_hn h + b_hn)),
        # h' = (1 − z) ⊙ n + z ⊙ h
        xr, xz, xn = x_proj.chunk(3, -1)
        hr, hz, hn = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h

    def forward(self, x, mask=None, h=None):
        # x: (B, T, d_in), mask: (B, T) bool or None -> outputs (B, T, d)
        B, T, _ = x.shape
        x_proj = F.linear(x, self.weight_ih, self.bias_ih)  # (B, T, 3d), every step at once
        h = x.new_zeros(B, self.weight_hh.shape[1]) if h is None else h
        out = []
        for t in range(T):
            h_new = self.cell(x_proj[:, t], h)
            h = h_new if mask is None else torch.where(mask[:, t, None], h_new, h)
            out.append(h)
        return torch.stack(out, 1)


class ContextInteraction(nn.Module):
    """Eq. 7-10 for one stream, for every target position of a sequence in one pass. The target
    at position j has the context u_0 .. u_{j-1}: nearby u_{j-2}, u_{j-1}, distant u_0 .. u_{j-3}.
    The GRUs are causal, so one run over the sequence serves every target, as in a language model."""

    def __init__(self, d):
        super().__init__()
        self.gru = GRU(d, d)     # Eq. 7, over the utterances
        self.gru_d = GRU(d, d)   # Eq. 8, over the distant utterance states
        self.query = nn.Linear(2 * d, d)  # Eq. 9
        self.out = nn.Linear(2 * d, d)    # Eq. 10's decision: P = W_o [attended ; Q]

    def forward(self, H, mask, weights=False):
        # H: (B, L, d) utterance vectors, mask: (B, L) -> P: (B, L + 1, d), P[:, j] for target j >= 2;
        # weights: also Eq. 10's attention, (B, L + 1, L): target j's weight on each distant state
        B, L, d = H.shape
        Hh = self.gru(H, mask)  # (B, L, d): Ĥ_i has seen u_0 .. u_i
        pad = H.new_zeros(B, 1, d)
        prev2 = torch.cat([pad, pad, Hh], 1)[:, :L + 1]  # (B, L + 1, d): row j holds Ĥ_{j-2}
        prev1 = torch.cat([pad, Hh], 1)                  # (B, L + 1, d): row j holds Ĥ_{j-1}
        Q = self.query(torch.cat([prev2, prev1], -1))  # (B, L + 1, d), Eq. 9
        C = self.gru_d(Hh, mask)  # (B, L, d): C_i after Ĥ_0 .. Ĥ_i, Eq. 8
        att = Q @ C.transpose(1, 2)  # (B, L + 1, L): Eq. 10's scores of target j over state i
        j, i = torch.arange(L + 1, device=H.device)[:, None], torch.arange(L, device=H.device)[None, :]
        visible = (i <= j - 3) & mask[:, None, :]  # target j sees the distant states 0 .. j-3
        # a target with no distant context attends to nothing: zero (a finite fill keeps gradients finite)
        att = att.masked_fill(~visible, torch.finfo(att.dtype).min).softmax(-1) * visible.any(-1, keepdim=True)
        P = self.out(torch.cat([att @ C, Q], -1))
        return (P, att) if weights else P


class NearbyContext(nn.Module):
    """w/o Dist (--no-distant): Eq. 7 and 9 on the nearby context alone. For each target j the
    utterance GRU runs over u_{j-2}, u_{j-1} only, from a zero state, so nothing before them reaches
    P; with no distant context, the attended vector of Eq. 10 is zero."""

    def __init__(self, d):
        super().__init__()
        self.gru = GRU(d, d)
        self.query = nn.Linear(2 * d, d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, H, mask):
        # H: (B, L, d), mask: (B, L) -> P: (B, L + 1, d), P[:, j] for target j >= 2
        B, L, d = H.shape
        x = F.linear(H, self.gru.weight_ih, self.gru.bias_ih)  # (B, L, 3d): each utterance's input share
        one = self.gru.cell(x.flatten(0, 1), H.new_zeros(B * L, d)).view(B, L, d)  # GRU(u_i), from zero
        two = self.gru.cell(x[:, 1:].flatten(0, 1), one[:, :-1].flatten(0, 1)).view(B, L - 1, d)  # GRU(u_{i-1}, u_i)
        pad = H.new_zeros(B, 2, d)
        prev2 = torch.cat([pad, one], 1)[:, :L + 1]  # (B, L + 1, d): row j holds GRU(u_{j-2})
        prev1 = torch.cat([pad, two], 1)[:, :L + 1]  # (B, L + 1, d): row j holds GRU(u_{j-2}, u_{j-1})
        Q = self.query(torch.cat([prev2, prev1], -1))  # (B, L + 1, d), Eq. 9
        return self.out(torch.cat([torch.zeros_like(Q), Q], -1))


class TCMP(nn.Module):
    """Figure 2. A batch (data.make_batch) holds each distinct utterance once: its encoders' inputs
    (text, text_mask, text_index; audio, audio_mask, audio_index: length buckets, and each utterance's
    row in them) or, from the feature cache of frozen encoders, their pooled outputs (text_feat,
    audio_feat: (U, D)); ctx (B, L), each context's or window's utterances as indices into those U,
    and ctx_mask (B, L), True at the real ones. Fine-tuning adds labels (B,), the emotions of the
    target utterances, and utt_labels (U,), each utterance's (-1: none); pre-training adds targets
    (N, 2), each target's window and position, and noise (N, k - 1), its noise candidates' indices."""

    def __init__(self, config: TCMPConfig):
        super().__init__()
        self.config = c = config
        self.text = "text" in c.modalities
        self.audio = "audio" in c.modalities
        if self.text:
            self.bert = Bert(BertConfig(**c.bert))
            self.proj_t = nn.Linear(self.bert.config.dim, c.d)
        if self.audio:
            self.hubert = Hubert(HubertConfig(**c.hubert))
            self.proj_a = nn.Linear(self.hubert.config.dim, c.d)
        # the streams β: text, audio and, with both, their fusion
        self.streams = [beta for beta, on in (("t", self.text), ("a", self.audio), ("m", self.text and self.audio))
                        if on]
        if "m" in self.streams:
            self.fuse = nn.Linear(2 * c.d, c.d)  # Eq. 6
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's, Eq. 17-20
        context = ContextInteraction if c.distant else NearbyContext  # Eq. 7-10, or w/o Dist
        self.context = nn.ModuleDict({beta: context(c.d) for beta in self.streams})
        self.drop = nn.Dropout(c.dropout)
        self.head1 = nn.Linear(len(self.streams) * c.d, c.d)  # Eq. 22
        self.head2 = nn.Linear(c.d, c.n_labels)
        if c.context_emotions:  # not in the paper: the emotion of each utterance from its vectors [H^t ; H^a ; H^m]
            self.recognise = nn.Linear(len(self.streams) * c.d, c.n_labels)
        # Eq. 23's class weights ω, from the training split (not saved with the model)
        self.register_buffer("class_weights", torch.ones(c.n_labels), persistent=False)
        # the encoders check their inputs (ids in the vocabulary, waveforms long enough), a host-device
        # sync on an accelerator: a caller whose data is already checked may turn it off
        self.check_inputs = True
        self.frozen = False
        self.fixed_layers = 0  # the text encoder's layers fixed beneath the ones trained (fix_layers)

    def encoders(self):
        return [m for m in (getattr(self, "bert", None), getattr(self, "hubert", None)) if m is not None]

    def freeze_encoders(self):
        """Train only the TCMP layers: the encoders keep their weights and run as at inference"""
        self.frozen = True
        for enc in self.encoders():
            enc.requires_grad_(False)
        return self.train(self.training)

    def fix_layers(self, n):
        """Train the text encoder's layers above its first n only: the embeddings and those n keep their
        weights, and the batches bring their outputs, the hidden states after layer n (computed once)"""
        self.fixed_layers = n
        b = self.bert
        for module in (b.tok_emb, b.pos_emb, b.type_emb, b.emb_ln, *b.layers[:n]):
            module.requires_grad_(False)
        return self

    def train(self, mode=True):
        super().train(mode)
        for enc in self.encoders() if self.frozen else ():
            enc.eval()  # no dropout in frozen encoders: the same outputs every step, as in the feature cache
        return self

    def pooled(self, key, batch):
        """Pooled outputs (Eq. 2-4) of one modality's encoder ("text" or "audio") on the batch's
        length buckets (see data.pad) -> (U, D_encoder), in the batch's utterance order"""
        out = []
        for x, mask in zip(batch[key], batch[key + "_mask"]):
            if key == "text" and self.fixed_layers:  # x: the hidden states after the fixed layers (fix_layers)
                out.append(pool(self.bert.layers_from(self.fixed_layers, x, mask), mask))
            elif key == "text":
                out.append(pool(self.bert(x, mask, check=self.check_inputs), mask))
            else:
                out.append(pool(*self.hubert(x, mask, check=self.check_inputs)))
        return torch.cat(out)[batch[key + "_index"]]

    def features(self, batch):
        """Every distinct utterance's pooled encoder outputs, once: from the batch's feature cache
        (text_feat, audio_feat) or by running the encoders -> {"text": (U, D_bert), "audio": (U, D_hubert)}"""
        return {key: batch[key + "_feat"] if key + "_feat" in batch else self.pooled(key, batch)
                for key in self.config.modalities}

    def encode(self, batch):
        """Every distinct utterance of the batch, once -> {β: (U, d)}"""
        f = self.features(batch)
        H = {}
        if self.text:
            H["t"] = torch.tanh(self.proj_t(f["text"]))  # Eq. 2, 4 and the projection
        if self.audio:
            H["a"] = torch.tanh(self.proj_a(f["audio"]))  # Eq. 3, 4
        if "m" in self.streams:
            H["m"] = self.fuse(torch.cat([H["t"], H["a"]], -1))  # Eq. 6
        return H

    def forward(self, batch):
        """What a training step calls, the same in both stages -> (output, loss, {part: value}). A
        batch with targets (pre-training): the TUS logits {β: (N, k)} and the loss of Eq. 21; else
        (fine-tuning) the emotion logits (B, n_labels) and, given labels, the loss of Eq. 23 (with
        --context-emotions, plus its weight times the loss on the context utterances' emotions)."""
        if "targets" in batch:
            return self.pretrain_loss(batch)
        H = self.encode(batch)
        logits = self.next_emotion(H, batch["ctx"], batch["ctx_mask"])
        if "labels" not in batch:
            return logits, None, {}
        loss = weighted_cross_entropy(logits, batch["labels"], self.class_weights)
        parts = {"wce": loss}
        if self.config.context_emotions:  # the batch's distinct labelled utterances, each once
            known = batch["utt_labels"] >= 0  # (U,)
            u = self.recognise(self.drop(torch.cat([H[beta][known] for beta in self.streams], -1)))
            parts["context"] = weighted_cross_entropy(u, batch["utt_labels"][known], self.class_weights)
            loss = loss + self.config.context_emotions * parts["context"]
        return logits, loss, parts

    def interact(self, H, ctx, ctx_mask):
        """Context vectors P^β for every target position: ctx (B, L) indexes H's utterances -> {β: (B, L+1, d)}"""
        return {beta: self.context[beta](self.drop(H[beta][ctx]), ctx_mask) for beta in self.streams}

    def next_emotion(self, H, ctx, ctx_mask):
        """Encoded utterances H, contexts ctx (B, L) indexing them -> logits (B, n_labels) of the target
        utterance's emotion, p(e_{N+1} | C_d, C_n) of Eq. 1 before its softmax: the context interaction
        (Eq. 7-10), then the head (Eq. 22). The real-time path calls this on cached utterance vectors."""
        P = self.interact(H, ctx, ctx_mask)
        last = ctx_mask.sum(1)  # (B,) the target utterance's position: right after the context
        # [P^t ; P^a ; P^m]: Eq. 22's [P^t ; P^m ; P^a] with W_1's columns in another order
        p = torch.cat([P[beta][torch.arange(len(last)), last] for beta in self.streams], -1)
        return self.head2(self.drop(torch.tanh(self.head1(p))))

    def tus_scores(self, H, P, batch):
        """Eq. 11-13 before the sigmoid: logits (N, k) of each target's candidates, true one first"""
        win, pos = batch["targets"].unbind(1)  # (N,), (N,): window and position of each target
        cands = torch.cat([batch["ctx"][win, pos, None], batch["noise"]], 1)  # (N, k) utterance indices
        return {beta: (P[beta][win, pos, None, :] * H[beta][cands]).sum(-1) for beta in self.streams}

    def pretrain_loss(self, batch):
        """Eq. 11-21 -> (the TUS logits {β: (N, k)}, the loss, {part: value})"""
        c = self.config
        H = self.encode(batch)
        P = self.interact(H, batch["ctx"], batch["ctx_mask"])
        logits = self.tus_scores(H, P, batch)
        parts = {}
        intra = [logits[beta] for beta in ("t", "a") if beta in logits]
        if c.tus in ("intra", "both") and intra:
            parts["intra"] = tus_loss(intra, c.tus_loss)
        if c.tus in ("inter", "both") and "m" in logits:
            parts["inter"] = tus_loss([logits["m"]], c.tus_loss)
        if not parts:
            raise ValueError(f"--tus {c.tus} has no loss with the modalities {c.modalities}")
        total = c.zeta * sum(parts.values())  # Eq. 16, 21
        if "m" in self.streams:
            parts["clip"] = clip_loss(H["t"], H["a"], self.logit_scale)
            total = total + c.eta * parts["clip"]
        return logits, total, parts


def tus_loss(logits, kind):
    """TUS over candidates, the true one at index 0. logits: the (N, k) scores of one modality (inter,
    Eq. 15) or of several whose probabilities multiply (intra, Eq. 14)."""
    if kind == "softmax":  # the authors' code: cross-entropy over the k candidates, per modality
        return sum(F.cross_entropy(x, torch.zeros(len(x), dtype=torch.long, device=x.device)) for x in logits)
    log_s = sum(F.logsigmoid(x) for x in logits)  # (N, k): log of the product of the scores s
    # -log s_true - sum over noise of log(1 - s); log(1 - e^a) = log(-expm1(a)), kept below 0
    noise = torch.log(-torch.expm1(log_s[:, 1:].clamp(max=-1e-6))).sum(1)
    return -(log_s[:, 0] + noise).mean()


def weighted_cross_entropy(logits, labels, weights):
    """Eq. 23: -ω(y) log softmax(logits)_y, the batch's mean; weights ω: (n_labels,). In float32 at
    least (bf16 logits on CUDA), float64 where given (the linear reference)"""
    nll = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")
    return (weights[labels] * nll).mean()


def clip_loss(ht, ha, logit_scale):
    """Eq. 17-20 with CLIP's L2 normalisation and learnable temperature (capped at 100)."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(ht, dim=-1) @ F.normalize(ha, dim=-1).T  # (U, U)
    target = torch.arange(len(ht), device=ht.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2  # (L_h + L_v) / 2

# -----------------------------------------------------------------------------
# loading real checkpoints

def read_checkpoint(path, prefix):
    """-> (tensors with the legacy names made current and `prefix` removed, the folder's config.json or {})"""
    path = os.fspath(path)
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no checkpoint at {file} (expected a folder holding model.safetensors, "
                                f"or a .safetensors file)")
    try:
        raw = load_file(file)
    except Exception as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    tensors = {}
    for name, t in raw.items():
        name = name[len(prefix):] if name.startswith(prefix) else name
        name = (name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
                .replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"))
        tensors[name] = t.float()
    folder = os.path.dirname(file)
    hf = {}
    for json_name in ("config.json", "preprocessor_config.json"):
        json_path = os.path.join(folder, json_name)
        if os.path.isfile(json_path):
            with open(json_path) as f:
                try:
                    hf.update(json.load(f))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    return tensors, hf


def pick(config_cls, hf, keys, inferred, fixed, path):
    """Build a config from Hugging Face config.json keys (hf name -> our field), falling back to
    sizes inferred from tensor shapes, then to the dataclass defaults. `fixed`: settings the code
    supports only one value of."""
    for key, want in fixed.items():
        if hf.get(key, want) != want:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (only {want!r})")
    values = dict(inferred)
    for hf_key, ours in keys.items():
        if hf_key in hf:
            values[ours] = tuple(hf[hf_key]) if isinstance(hf[hf_key], list) else hf[hf_key]
    return config_cls(**values)


def bert_config(hf, tensors, path):
    we = tensors.get("embeddings.word_embeddings.weight")
    inferred = {}
    if we is not None:  # without config.json: sizes from the shapes, 64-wide heads as in every BERT
        inferred = dict(vocab_size=we.shape[0], dim=we.shape[1], n_head=we.shape[1] // 64,
                        n_layer=len({n.split(".")[2] for n in tensors if n.startswith("encoder.layer.")}))
        for name, field, axis in (("embeddings.position_embeddings.weight", "max_positions", 0),
                                  ("embeddings.token_type_embeddings.weight", "type_vocab_size", 0),
                                  ("encoder.layer.0.intermediate.dense.weight", "ffn_dim", 0)):
            if name in tensors:
                inferred[field] = tensors[name].shape[axis]
    keys = dict(vocab_size="vocab_size", hidden_size="dim", num_hidden_layers="n_layer",
                num_attention_heads="n_head", intermediate_size="ffn_dim",
                max_position_embeddings="max_positions", type_vocab_size="type_vocab_size",
                layer_norm_eps="eps", hidden_dropout_prob="dropout")
    fixed = dict(hidden_act="gelu", position_embedding_type="absolute")
    return pick(BertConfig, hf, keys, inferred, fixed, path)


def hubert_config(hf, tensors, path):
    inferred = {}
    proj = tensors.get("feature_projection.projection.weight")
    if proj is not None:  # without config.json: sizes from the shapes, the standard strides
        convs = sorted((n for n in tensors if n.startswith("feature_extractor.conv_layers.") and n.endswith("conv.weight")),
                       key=lambda n: int(n.split(".")[2]))
        layer_norm = "feature_extractor.conv_layers.1.layer_norm.weight" in tensors
        inferred = dict(dim=proj.shape[0], n_head=proj.shape[0] // 64,
                        n_layer=len({n.split(".")[2] for n in tensors if n.startswith("encoder.layers.")}),
                        conv_dim=tuple(tensors[n].shape[0] for n in convs),
                        conv_kernel=tuple(tensors[n].shape[2] for n in convs),
                        conv_bias="feature_extractor.conv_layers.0.conv.bias" in tensors,
                        feat_norm="layer" if layer_norm else "group", pre_ln=layer_norm,
                        feat_proj_ln="feature_projection.layer_norm.weight" in tensors)
        if "encoder.pos_conv_embed.conv.weight_v" in tensors:
            v = tensors["encoder.pos_conv_embed.conv.weight_v"]
            inferred.update(pos_kernel=v.shape[2], pos_groups=v.shape[0] // v.shape[1])
        if "encoder.layers.0.feed_forward.intermediate_dense.weight" in tensors:
            inferred["ffn_dim"] = tensors["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0]
    keys = dict(hidden_size="dim", num_hidden_layers="n_layer", num_attention_heads="n_head",
                intermediate_size="ffn_dim", conv_dim="conv_dim", conv_kernel="conv_kernel",
                conv_stride="conv_stride", conv_bias="conv_bias", feat_extract_norm="feat_norm",
                do_stable_layer_norm="pre_ln", feat_proj_layer_norm="feat_proj_ln",
                num_conv_pos_embeddings="pos_kernel", num_conv_pos_embedding_groups="pos_groups",
                layer_norm_eps="eps", hidden_dropout="dropout", do_normalize="normalize_wave")
    fixed = dict(hidden_act="gelu", feat_extract_activation="gelu", conv_pos_batch_norm=False, sampling_rate=16000)
    return pick(HubertConfig, hf, keys, inferred, fixed, path)


# known checkpoint extras that the encoders do not use (heads, buffers)
BERT_EXTRAS = ("cls.", "pooler.", "embeddings.position_ids")
HUBERT_EXTRAS = ("lm_head.", "masked_spec_embed", "label_embs_concat", "final_proj.")


def layer_names(ours, theirs, mapping):
    # weight and bias of each module in mapping: {our module: checkpoint module}, under the two prefixes
    ours = f"{ours}." if ours else ""
    return {f"{ours}{a}.{p}": f"{theirs}.{b}.{p}" for a, b in mapping.items() for p in ("weight", "bias")}


def bert_names(c: BertConfig):
    """our parameter name -> checkpoint name (after read_checkpoint's clean-up)"""
    names = {"tok_emb.weight": "embeddings.word_embeddings.weight",
             "pos_emb.weight": "embeddings.position_embeddings.weight",
             "type_emb.weight": "embeddings.token_type_embeddings.weight",
             "emb_ln.weight": "embeddings.LayerNorm.weight", "emb_ln.bias": "embeddings.LayerNorm.bias"}
    for i in range(c.n_layer):
        names |= layer_names(f"layers.{i}", f"encoder.layer.{i}", {
            "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
            "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
            "fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm"})
    return names


def hubert_names(c: HubertConfig):
    names = {}
    for i in range(len(c.conv_kernel)):
        names[f"convs.{i}.conv.weight"] = f"feature_extractor.conv_layers.{i}.conv.weight"
        if c.conv_bias:
            names[f"convs.{i}.conv.bias"] = f"feature_extractor.conv_layers.{i}.conv.bias"
        if c.feat_norm == "layer" or i == 0:
            names |= layer_names(f"convs.{i}", f"feature_extractor.conv_layers.{i}", {"norm": "layer_norm"})
    names |= layer_names("", "feature_projection", {"proj": "projection"})
    if c.feat_proj_ln:
        names |= layer_names("", "feature_projection", {"proj_ln": "layer_norm"})
    names |= layer_names("", "encoder", {"ln": "layer_norm"})
    names |= {f"pos_conv.{p}": f"encoder.pos_conv_embed.conv.{p}" for p in ("weight_g", "weight_v", "bias")}
    for i in range(c.n_layer):
        names |= layer_names(f"layers.{i}", f"encoder.layers.{i}", {
            "attn.q": "attention.q_proj", "attn.k": "attention.k_proj", "attn.v": "attention.v_proj",
            "attn.o": "attention.out_proj", "ln1": "layer_norm", "fc1": "feed_forward.intermediate_dense",
            "fc2": "feed_forward.output_dense", "ln2": "final_layer_norm"})
    return names


def load_pretrained(cls, path, model_type, make_config, make_names, extras):
    """An encoder of class cls from a checkpoint of model_type ("bert", "hubert": its tensors' name
    prefix too): its config (config.json, else the tensor shapes), then every tensor through the name
    map. A config.json of another model_type (a RoBERTa's, a GPT-2's) is refused by its name."""
    tensors, hf = read_checkpoint(path, model_type + ".")
    if hf.get("model_type", model_type) != model_type:
        raise ValueError(f"{path} holds a {hf['model_type']!r} checkpoint (config.json's model_type); "
                         f"{cls.__name__} loads {model_type!r} ones")
    config = make_config(hf, tensors, path)
    model = cls(config)
    load_state(model, tensors, make_names(config), extras, path)
    return model


def load_state(model, tensors, names, extras, path):
    """Copy checkpoint tensors into the model by the explicit name map; any missing, unexpected or
    mis-shaped tensor is listed in one error."""
    state = model.state_dict()
    assert set(names) == set(state), "name map out of date with the model"  # a bug in this file, not in the input
    missing = [f"{theirs} {tuple(state[ours].shape)}" for ours, theirs in names.items() if theirs not in tensors]
    used = set(names.values())
    unexpected = [f"{n} {tuple(t.shape)}" for n, t in tensors.items()
                  if n not in used and not n.startswith(extras)]
    shapes = [f"{theirs}: checkpoint {tuple(tensors[theirs].shape)}, model {tuple(state[ours].shape)}"
              for ours, theirs in names.items()
              if theirs in tensors and tensors[theirs].shape != state[ours].shape]
    problems = [f"{title}:\n  " + "\n  ".join(items) for title, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", shapes))
                if items]
    if problems:
        raise ValueError(f"{path} does not fit {type(model).__name__}({model.config}):\n" + "\n".join(problems))
    model.load_state_dict({ours: tensors[theirs] for ours, theirs in names.items()})
