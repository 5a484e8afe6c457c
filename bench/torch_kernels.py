#!/usr/bin/env python3
"""PyTorch's versions of the kernels that bench/cuda_kernels_bench.cc times, at the same GPT-2 124M
shapes and with the same byte / FLOP counts, so the two tables line up row by row
(bench/README-gpu.md). Eager PyTorch ops (what an uncompiled model calls; torch.compile fuses
some of them), bf16 unless --dtype.

Rows and what stands in for each Strata kernel:
  copy                 dst.copy_(src), 1 GiB               (the memory ceiling, read + write)
  gemm                 a @ b, 8192^3                        (the matrix ceiling)
  layernorm_fwd        F.layer_norm(fp32 x -> T)            (Strata reads fp32, writes T)
  resid_layernorm_fwd  r = x + branch; F.layer_norm(r)
  layernorm_bwd        autograd of layer_norm (dx, dw, db)
  gelu_fwd / gelu_bwd  F.gelu(tanh) / torch.ops.aten.gelu_backward
  add_bias / bias_bwd  x += bias / dout.sum(0) in fp32
  residual_fwd         out = a + b.float()
  softmax_xent_loss    F.cross_entropy(logits.float()) forward
  softmax_xent_grad    forward + backward of the same (the gradient written as T)
  adamw                torch.optim.AdamW(fused=True) step over 124M fp32 params
  embedding_fwd/bwd    wte[idx] + wpe / index_put_ accumulate into fp32 tables
  attention_fwd/bwd    F.scaled_dot_product_attention(is_causal=True) (flash) fwd / fwd+bwd
                       minus fwd
  linear_*_fwd/_bwd    F.linear (+ gelu for fc) / autograd backward (dinp, dw)
  sum_of_squares       torch.linalg.vector_norm(x)**2
  cast_from_fp32       x.to(T)

Timing: torch.utils.benchmark-style: 3 warm-ups, --reps repetitions of --iters launches between
CUDA events, median reported. Prints a markdown table and, with --json, the rows in the same
schema as cuda_kernels_bench --json.

  python3 bench/torch_kernels.py [--filter SUBSTR] [--iters 20] [--reps 5] [--json FILE]
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

B, T, C, NH, L = 8, 1024, 768, 12, 12
V, VALID = 50304, 50257
N = B * T


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--filter", default="")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_kernels.py: no CUDA device visible; nothing to measure", file=sys.stderr)
        return 77
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    s = torch.tensor([], dtype=dt).element_size()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # as CudaBlas's default for fp32
    rows = []

    def rnd(*shape, dtype=dt, lo=-1.0, hi=1.0):
        return torch.empty(*shape, device=dev, dtype=torch.float32).uniform_(lo, hi).to(dtype)

    def selected(name):
        return not args.filter or args.filter in name or name in ("copy", "gemm")

    def time(name, shape, nbytes, flops, fn, minus=None):
        if not selected(name):
            return
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        per = []
        for _ in range(args.reps):
            start.record()
            for _ in range(args.iters):
                fn()
            stop.record()
            stop.synchronize()
            per.append(start.elapsed_time(stop) / args.iters)
        per.sort()
        ms = per[len(per) // 2]
        if minus is not None:  # e.g. backward = (forward + backward) - forward
            ms = max(ms - next(r["ms"] for r in rows if r["name"] == minus), 1e-6)
        rows.append({"name": name, "shape": shape, "ms": ms, "bytes": nbytes, "flops": flops})
        print(f"  {name:<22} {ms:10.4f} ms", file=sys.stderr)

    # ---- ceilings
    nbytes = 1 << 30
    src = torch.empty(nbytes // 4, device=dev).uniform_()
    dst = torch.empty_like(src)
    time("copy", "1 GiB d2d", 2.0 * nbytes, 0, lambda: dst.copy_(src))
    del src, dst
    m = 8192
    a, b = rnd(m, m), rnd(m, m)
    time("gemm", f"8192^3 {args.dtype}", 0, 2.0 * m ** 3, lambda: a @ b)
    del a, b

    nc = float(N * C)
    shape = f"{N}x{C}"
    # ---- layernorm
    if any(selected(n) for n in ("layernorm_fwd", "resid_layernorm_fwd", "layernorm_bwd")):
        x = rnd(N, C, dtype=torch.float32, lo=-2, hi=2)
        branch = rnd(N, C)
        w, bias = rnd(C, lo=0.5, hi=1.5), rnd(C, lo=-0.1, hi=0.1)
        time("layernorm_fwd", shape, nc * (4 + s) + 8.0 * N, 0,
             lambda: F.layer_norm(x, (C,), w.float(), bias.float()).to(dt))

        def resid_ln():
            r = x + branch.float()
            return F.layer_norm(r, (C,), w.float(), bias.float()).to(dt)

        time("resid_layernorm_fwd", shape, nc * (8 + 2 * s) + 8.0 * N, 0, resid_ln)
        xg = x.clone().requires_grad_(True)
        wg, bg = w.float().requires_grad_(True), bias.float().requires_grad_(True)
        dout = rnd(N, C).float()

        def ln_fwd_bwd():
            y = F.layer_norm(xg, (C,), wg, bg)
            torch.autograd.grad(y, (xg, wg, bg), dout)

        time("layernorm_fwd_bwd", shape, 0, 0, ln_fwd_bwd)
        time("layernorm_bwd", shape, nc * (s + 12) + 8.0 * N, 0, ln_fwd_bwd,
             minus="layernorm_fwd")
        rows[:] = [r for r in rows if r["name"] != "layernorm_fwd_bwd"]
        del x, branch, xg, dout

    # ---- elementwise on the MLP hidden activation
    n = N * 4 * C
    hshape = f"{N}x{4 * C}"
    inp, dout = rnd(N, 4 * C, lo=-3, hi=3), rnd(N, 4 * C)
    out = torch.empty_like(inp)
    time("gelu_fwd", hshape, n * 2.0 * s, 0, lambda: torch.nn.functional.gelu(inp, approximate="tanh"))
    time("gelu_bwd", hshape, n * 3.0 * s, 0,
         lambda: torch.ops.aten.gelu_backward(dout, inp, approximate="tanh"))
    bias4 = rnd(4 * C, lo=-0.1, hi=0.1)
    time("add_bias", hshape, n * 2.0 * s, 0, lambda: out.add_(bias4))
    time("bias_bwd", hshape, n * 1.0 * s, 0, lambda: dout.sum(0, dtype=torch.float32))
    a32 = rnd(N, C, dtype=torch.float32)
    b_t = inp[:, :C].contiguous()
    time("residual_fwd", shape, nc * (8 + s), 0, lambda: a32 + b_t.float())
    del inp, dout, out, a32, b_t

    # ---- softmax cross-entropy over the padded vocabulary
    if selected("softmax_xent"):
        logits = rnd(N, V, lo=-4, hi=4)
        logits[:, VALID:] = float("-inf")
        targets = torch.randint(0, VALID, (N,), device=dev)
        nv = float(N * V)
        time("softmax_xent_loss", f"{N}x{V}", nv * s + 8.0 * N, 0,
             lambda: F.cross_entropy(logits.float(), targets))
        lg = logits.detach().requires_grad_(True)

        def xent_grad():
            loss = F.cross_entropy(lg.float(), targets)
            torch.autograd.grad(loss, lg)

        time("softmax_xent_grad", f"{N}x{V}", nv * 2 * s + 8.0 * N, 0, xent_grad)
        del logits, lg

    # ---- AdamW over GPT-2 124M (padded vocabulary), fp32 master weights
    n_params = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    if selected("adamw"):
        p = torch.nn.Parameter(rnd(n_params, dtype=torch.float32, lo=-0.1, hi=0.1))
        p.grad = rnd(n_params, dtype=torch.float32, lo=-0.01, hi=0.01)
        opt = torch.optim.AdamW([p], lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        opt.step()  # creates the moments
        time("adamw", f"{n_params} params", n_params * 28.0, 0, opt.step)
        del p, opt

    # ---- embedding
    if selected("embedding"):
        idx = torch.randint(0, VALID, (B, T), device=dev)
        wte, wpe = rnd(V, C, lo=-0.1, hi=0.1), rnd(T, C, lo=-0.1, hi=0.1)
        pos = torch.arange(T, device=dev)
        time("embedding_fwd", shape, nc * (s + 4) + T * C * s + 4.0 * N, 0,
             lambda: F.embedding(idx, wte).float() + F.embedding(pos, wpe).float())
        distinct = int(torch.unique(idx).numel())
        dwte, dwpe = torch.zeros(V, C, device=dev), torch.zeros(T, C, device=dev)
        g = rnd(N, C, dtype=torch.float32)
        flat = idx.view(-1)

        def emb_bwd():
            dwte.index_put_((flat,), g, accumulate=True)
            dwpe.add_(g.view(B, T, C).sum(0))

        time("embedding_bwd", shape, 4.0 * nc + 8.0 * C * distinct + 8.0 * T * C + 4.0 * N, 0,
             emb_bwd)

    # ---- attention (flash through SDPA)
    if selected("attention"):
        hs = C // NH
        ashape = f"B{B} T{T} NH{NH} hs{hs}"
        q, k, v = (rnd(B, NH, T, hs).requires_grad_(True) for _ in range(3))
        fwd_flops = 2.0 * B * T * T * C
        io = nc * 4 * s + 4.0 * B * NH * T
        time("attention_fwd", ashape, io, fwd_flops,
             lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        do = rnd(B, NH, T, hs)

        def attn_fwd_bwd():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(o, (q, k, v), do)

        time("attention_bwd", ashape, 0, 2.5 * fwd_flops, attn_fwd_bwd, minus="attention_fwd")

    # ---- linears
    for name, cin, cout, has_bias, gelu in (("qkv", C, 3 * C, True, False),
                                            ("attn_proj", C, C, True, False),
                                            ("fc", C, 4 * C, True, True),
                                            ("fc_proj", 4 * C, C, True, False),
                                            ("lm_head", C, V, False, False)):
        tag = f"linear_{name}"
        if not (selected(tag + "_fwd") or selected(tag + "_bwd")):
            continue
        lshape = f"{N}x{cin} -> {cout}"
        x = rnd(N, cin).requires_grad_(True)
        w = rnd(cout, cin, lo=-0.05, hi=0.05).requires_grad_(True)
        bb = rnd(cout, lo=-0.1, hi=0.1).requires_grad_(True) if has_bias else None
        f = 2.0 * N * cin * cout

        def fwd():
            y = F.linear(x, w, bb)
            return F.gelu(y, approximate="tanh") if gelu else y

        time(tag + "_fwd", lshape + (" +gelu" if gelu else ""), 0, f, fwd)
        gy = rnd(N, cout)

        def bwd_only_linear():
            y = F.linear(x, w, bb)
            torch.autograd.grad(y, (x, w) + ((bb,) if has_bias else ()), gy)

        def plain_fwd():
            return F.linear(x, w, bb)

        time(tag + "_plainfwd", lshape, 0, 0, plain_fwd)
        time(tag + "_bwd", lshape, 0, 2 * f, bwd_only_linear, minus=tag + "_plainfwd")
        rows[:] = [r for r in rows if r["name"] != tag + "_plainfwd"]

    # ---- reductions
    xr = rnd(n_params, dtype=torch.float32)
    time("sum_of_squares", f"{n_params} fp32", 4.0 * n_params, 0,
         lambda: torch.linalg.vector_norm(xr) ** 2)
    if dt != torch.float32:
        time("cast_from_fp32", f"{n_params} fp32", n_params * (4.0 + s), 0, lambda: xr.to(dt))

    copy_gbps = next(r for r in rows if r["name"] == "copy")
    copy_gbps = copy_gbps["bytes"] / (copy_gbps["ms"] * 1e6)
    gemm = next(r for r in rows if r["name"] == "gemm")
    gemm_tflops = gemm["flops"] / (gemm["ms"] * 1e9)
    for r in rows:
        r["gbps"] = r["bytes"] / (r["ms"] * 1e6) if r["bytes"] else 0.0
        r["tflops"] = r["flops"] / (r["ms"] * 1e9) if r["flops"] else 0.0
        r["frac_copy"] = r["gbps"] / copy_gbps
        r["frac_gemm"] = r["tflops"] / gemm_tflops

    print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__} | dtype "
          f"{args.dtype} | B={B} T={T} C={C} NH={NH} V={V} | median of {args.reps} x "
          f"{args.iters} launches")
    print(f"ceilings: copy {copy_gbps:.0f} GB/s (read+write), gemm {gemm_tflops:.1f} TFLOP/s")
    print(f"| {'op (torch)':<22} | {'shape':<28} | {'ms':>9} | {'GB/s':>8} | {'%copy':>6} | "
          f"{'TFLOP/s':>8} | {'%gemm':>6} |")
    print("|" + "|".join("-" * w for w in (24, 30, 11, 10, 8, 10, 8)) + "|")
    for r in rows:
        gb = f"{r['gbps']:.0f}" if r["bytes"] else ""
        pc = f"{100 * r['frac_copy']:.0f}%" if r["bytes"] else ""
        tf = f"{r['tflops']:.1f}" if r["flops"] else ""
        pg = f"{100 * r['frac_gemm']:.0f}%" if r["flops"] else ""
        print(f"| {r['name']:<22} | {r['shape']:<28} | {r['ms']:9.4f} | {gb:>8} | {pc:>6} | "
              f"{tf:>8} | {pg:>6} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "dtype": args.dtype, "b": B, "t": T, "c": C, "nh": NH, "vocab": V,
                       "copy_gbps": copy_gbps, "gemm_tflops": gemm_tflops, "rows": rows}, fh)
            fh.write("\n")
    return 0 if all(math.isfinite(r["ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
