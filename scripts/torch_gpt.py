"""The Strata GPT written in plain PyTorch: the reference for parity tests and benchmarks.

Architecture (identical to model/gpt.cc): learned token + position embeddings, pre-LN blocks
(LayerNorm eps 1e-5, fused qkv Linear, causal softmax attention, output Linear; LayerNorm,
Linear 4x, GELU tanh, Linear), final LayerNorm, LM head tied to the token embedding.
Parameter names match Strata's ParamTensor names; Linear weights are [out, in] in both.

Weight files written by Strata: a flat little-endian float32 array in the order and at the
offsets listed by the manifest (one line per tensor: "name offset decay dim0 [dim1]").
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c, eps=1e-5)
        self.c_attn = nn.Linear(c, 3 * c)
        self.attn_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=1e-5)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x, mask):
        b, t, c = x.shape
        hs = c // self.nh
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q = q.view(b, t, self.nh, hs).transpose(1, 2)
        k = k.view(b, t, self.nh, hs).transpose(1, 2)
        v = v.view(b, t, self.nh, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(mask[:t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.attn_proj(y)
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, vocab, max_seq, layers, heads, c):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(max_seq, c)
        self.h = nn.ModuleList([Block(c, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(c, eps=1e-5)
        self.register_buffer("mask", torch.tril(torch.ones(max_seq, max_seq)))

    def forward(self, idx, targets):
        b, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.h:
            x = blk(x, self.mask)
        x = self.ln_f(x)
        logits = x @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def strata_params(self):
        """(strata_name, parameter) pairs in Strata's order."""
        out = [("wte.weight", self.wte.weight), ("wpe.weight", self.wpe.weight)]
        for i, blk in enumerate(self.h):
            p = f"h.{i}."
            out += [
                (p + "ln_1.weight", blk.ln_1.weight), (p + "ln_1.bias", blk.ln_1.bias),
                (p + "attn.c_attn.weight", blk.c_attn.weight),
                (p + "attn.c_attn.bias", blk.c_attn.bias),
                (p + "attn.c_proj.weight", blk.attn_proj.weight),
                (p + "attn.c_proj.bias", blk.attn_proj.bias),
                (p + "ln_2.weight", blk.ln_2.weight), (p + "ln_2.bias", blk.ln_2.bias),
                (p + "mlp.c_fc.weight", blk.c_fc.weight), (p + "mlp.c_fc.bias", blk.c_fc.bias),
                (p + "mlp.c_proj.weight", blk.mlp_proj.weight),
                (p + "mlp.c_proj.bias", blk.mlp_proj.bias),
            ]
        out += [("ln_f.weight", self.ln_f.weight), ("ln_f.bias", self.ln_f.bias)]
        return out


def read_manifest(path):
    """Returns [(name, offset, decay, shape)]."""
    entries = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            entries.append((parts[0], int(parts[1]), parts[2] == "1", tuple(int(x) for x in parts[3:])))
    return entries


def load_flat(model, manifest, flat):
    named = dict(model.strata_params())
    with torch.no_grad():
        for name, off, _, shape in manifest:
            n = int(np.prod(shape))
            named[name].copy_(torch.from_numpy(flat[off:off + n].reshape(shape).copy()))


def flatten(model, manifest, attr="data"):
    named = dict(model.strata_params())
    total = sum(int(np.prod(s)) for _, _, _, s in manifest)
    out = np.zeros(total, dtype=np.float64)
    for name, off, _, shape in manifest:
        t = getattr(named[name], attr)
        n = int(np.prod(shape))
        out[off:off + n] = t.detach().double().reshape(-1).cpu().numpy()
    return out


def learning_rate(step, total, warmup, lr, min_lr):
    """Same schedule as model/optimizer.cc LearningRate."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    ratio = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def make_optimizer(model, manifest, lr, betas, eps, weight_decay):
    named = dict(model.strata_params())
    decay = [named[n] for n, _, d, _ in manifest if d]
    no_decay = [named[n] for n, _, d, _ in manifest if not d]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps)
