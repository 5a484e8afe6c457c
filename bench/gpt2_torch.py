#!/usr/bin/env python3
"""PyTorch reference for GPT-2 124M training throughput: the number Strata's CUDA path is measured
against (bench/gpu_vs_torch.py runs both on one GPU; bench/README-gpu.md has the commands).

The model is nanoGPT's GPT-2: pre-LN blocks, fused qkv, GELU (tanh), tied wte / lm_head, biases,
flash attention through F.scaled_dot_product_attention(is_causal=True). Training: AdamW (betas 0.9,
0.95, eps 1e-8, weight decay 0.1 on 2-D tensors, fused on CUDA), gradient clipping at 1.0, bf16
autocast (fp32 master weights), torch.compile unless --no-compile. Defaults: n_layer 12, n_head 12,
n_embd 768, seq 1024, micro-batch 8, vocabulary 50304 (50257 padded to a multiple of 128, as
nanoGPT and llm.c do; --vocab 50257 for the exact GPT-2 size, which is what Strata trains).

Timing: --warmup steps (compilation, autotuning, allocator growth) are run and discarded, then
--steps timed steps, each between torch.cuda.synchronize() calls; per-step ms are reported as
mean / median / min, and tokens/s = tokens per step / median step time.

MFU (model FLOPs utilisation) against --peak-tflops (default 989: H100 SXM dense bf16):
  flops_per_token_6n   = 6 N
  flops_per_token_attn = 6 N + 12 L C T   (PaLM appendix B; L layers, C = n_head * head_size,
                                           T = seq; causal masking not subtracted, as nanoGPT and
                                           Strata's trainer count it)
  mfu = flops_per_token * tokens/s / peak
N is every trainable parameter, wte counted once (tied with lm_head) and wpe included -- the same
count as Strata's trainer (worker/trainer.cc: 6 * NumParameters + 12 * L * C * T).

Output: one JSON object on stdout (and to --json FILE): tokens_per_s, mfu_6n, mfu_attn,
peak_mem_bytes (torch.cuda.max_memory_allocated), peak_reserved_bytes, step_ms_*, config.

Smoke test on a CPU (no GPU needed; a tiny model, no compile):
  python3 bench/gpt2_torch.py --device cpu --tiny --steps 2
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def causal_attention(q, k, v):
    """Flash attention where PyTorch has it (2.0+); an explicit masked softmax otherwise (only the
    CPU smoke test on an old PyTorch takes that path; the output JSON says which ran)."""
    if HAVE_SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


HAVE_SDPA = hasattr(F, "scaled_dot_product_attention")
HAVE_COMPILE = hasattr(torch, "compile")


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q = q.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        k = k.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        v = v.view(b, t, self.nh, c // self.nh).transpose(1, 2)
        y = causal_attention(q, k, v)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, seq, layers, heads, c):
        super().__init__()
        self.wte = nn.Embedding(vocab, c)
        self.wpe = nn.Embedding(seq, c)
        self.h = nn.ModuleList(Block(c, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c)
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        std_proj = 0.02 / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std_proj if name.endswith("proj.weight") else 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def read_llmc_tokens(path, limit):
    """Tokens of an llm.c .bin shard (256 x int32 header {20240520, 1, count}, uint16 tokens)."""
    import numpy as np

    header = np.fromfile(path, dtype=np.int32, count=256)
    if header[0] != 20240520:
        raise SystemExit(f"{path}: not an llm.c token shard (magic {header[0]})")
    count = min(int(header[2]), limit)
    return np.fromfile(path, dtype=np.uint16, count=count, offset=1024).astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true",
                    help="2 layers, 2 heads, n_embd 64, seq 64, vocab 512, batch 2 (smoke test)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304,
                    help="50304 = 50257 padded (default); 50257 = exact GPT-2, as Strata")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 on CPU)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="bf16 autocast (default) or plain fp32 (TF32 matmuls on CUDA)")
    ap.add_argument("--no-compile", action="store_true", help="eager mode (no torch.compile)")
    ap.add_argument("--compile", action="store_true", help="torch.compile on CPU too")
    ap.add_argument("--data", default="", help="an llm.c .bin token shard; default: random tokens")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", default="", help="also write the JSON result here")
    ap.add_argument("--profile", default="",
                    help="write a torch.profiler table of 3 steps (by CUDA time) to this file")
    args = ap.parse_args()

    if args.tiny:
        args.layers, args.heads, args.embd, args.seq, args.vocab = 2, 2, 64, 64, 512
        args.batch = min(args.batch, 2)
    if args.warmup is None:
        args.warmup = 5 if args.device == "cuda" else 1
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpt2_torch.py: --device cuda but torch.cuda.is_available() is False")
    use_compile = (not args.no_compile) and (args.device == "cuda" or args.compile)
    if use_compile and not HAVE_COMPILE:
        print(f"gpt2_torch.py: torch {torch.__version__} has no torch.compile; running eager",
              file=sys.stderr)
        use_compile = False
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model = GPT(args.vocab, args.seq, args.layers, args.heads, args.embd).to(dev)
    n_params = sum(p.numel() for p in model.parameters())  # tied weight counted once
    n_embed = model.wte.weight.numel() + model.wpe.weight.numel()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt_kwargs = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    if args.device == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)

    step_model = torch.compile(model) if use_compile else model

    # Batches: pre-staged on the device so the loop measures training, not the data loader.
    tokens_per_step = args.batch * args.seq
    n_batches = 8
    need = n_batches * tokens_per_step + 1
    g = torch.Generator().manual_seed(args.seed)
    if args.data:
        toks = torch.from_numpy(read_llmc_tokens(args.data, need))
        if toks.numel() < need:
            raise SystemExit(f"{args.data}: {toks.numel()} tokens, need {need}")
        if int(toks.max()) >= args.vocab:
            raise SystemExit(f"{args.data}: token {int(toks.max())} >= --vocab {args.vocab}")
    else:
        toks = torch.randint(0, min(args.vocab, 50257), (need,), generator=g)
    xs = [toks[i * tokens_per_step:(i + 1) * tokens_per_step].view(args.batch, args.seq).to(dev)
          for i in range(n_batches)]
    ys = [toks[i * tokens_per_step + 1:(i + 1) * tokens_per_step + 1].view(args.batch, args.seq)
          .to(dev) for i in range(n_batches)]

    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def train_step(i):
        with torch.autocast(device_type=args.device, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = step_model(xs[i % n_batches], ys[i % n_batches])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first_loss = None
    for i in range(args.warmup):
        loss = train_step(i)
        if first_loss is None:
            first_loss = float(loss)
    sync()
    warmup_s = time.perf_counter() - t0
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    step_ms = []
    for i in range(args.steps):
        sync()
        t = time.perf_counter()
        loss = train_step(args.warmup + i)
        sync()
        step_ms.append(1e3 * (time.perf_counter() - t))
    last_loss = float(loss)
    if first_loss is None:
        first_loss = last_loss

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                train_step(i)
            sync()
        key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40))

    median = statistics.median(step_ms)
    tps = tokens_per_step / (median / 1e3)
    f6n = 6.0 * n_params
    fattn = f6n + 12.0 * args.layers * args.embd * args.seq
    peak = args.peak_tflops * 1e12
    out = {
        "impl": "torch",
        "torch_version": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "",
        "compile": use_compile,
        "attention": "sdpa" if HAVE_SDPA else "manual",
        "dtype": args.dtype,
        "config": {"layers": args.layers, "heads": args.heads, "embd": args.embd, "seq": args.seq,
                   "vocab": args.vocab, "batch": args.batch},
        "params": n_params,
        "params_non_embedding": n_params - n_embed,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 3),
        "steps": args.steps,
        "step_ms_mean": round(statistics.mean(step_ms), 3),
        "step_ms_median": round(median, 3),
        "step_ms_min": round(min(step_ms), 3),
        "tokens_per_s": round(tps, 1),
        "flops_per_token_6n": f6n,
        "flops_per_token_attn": fattn,
        "peak_tflops": args.peak_tflops,
        "mfu_6n": round(f6n * tps / peak, 5),
        "mfu_attn": round(fattn * tps / peak, 5),
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if args.device == "cuda" else None,
        "loss_first": round(first_loss, 5),
        "loss_last": round(last_loss, 5),
    }
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not math.isfinite(last_loss):
        print("gpt2_torch.py: non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
