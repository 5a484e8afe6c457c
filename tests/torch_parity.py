"""PyTorch side of tests/torch_parity_test.cc.

Reads what the C++ test wrote into DIR (config.txt, manifest.txt, init.bin, batches.bin), trains
the same GPT with torch.optim.AdamW on the same batches in fp32, and writes
  torch_losses.txt   one mean loss per step
  torch_final.bin    final weights, float64, Strata's flat layout
  torch_grad0.bin    gradient of step 0's loss at the initial weights, computed in float64
Run with Debian's interpreter: /usr/bin/python3 tests/torch_parity.py DIR
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import torch_gpt  # noqa: E402


def main(d):
    cfg = {}
    with open(os.path.join(d, "config.txt")) as f:
        for line in f:
            k, v = line.split("=", 1)
            cfg[k.strip()] = v.strip()
    i = lambda k: int(cfg[k])  # noqa: E731
    fl = lambda k: float(cfg[k])  # noqa: E731
    torch.manual_seed(0)
    torch.set_num_threads(1)
    manifest = torch_gpt.read_manifest(os.path.join(d, "manifest.txt"))
    init = np.fromfile(os.path.join(d, "init.bin"), dtype="<f4")
    steps, accum, b, t = i("steps"), i("accum"), i("micro_batch"), i("seq_len")
    batches = np.fromfile(os.path.join(d, "batches.bin"), dtype="<i4").reshape(steps, accum, 2, b, t)

    def build(dtype):
        m = torch_gpt.GPT(i("vocab"), i("max_seq_len"), i("layers"), i("heads"), i("d_model"))
        torch_gpt.load_flat(m, manifest, init)
        return m.to(dtype)

    # float64 gradient of step 0 at the initial weights.
    m64 = build(torch.float64)
    for mi in range(accum):
        x = torch.from_numpy(batches[0, mi, 0].astype(np.int64))
        y = torch.from_numpy(batches[0, mi, 1].astype(np.int64))
        (m64(x, y) / accum).backward()
    torch_gpt.flatten(m64, manifest, "grad").tofile(os.path.join(d, "torch_grad0.bin"))

    model = build(torch.float32)
    opt = torch_gpt.make_optimizer(model, manifest, fl("lr"), (fl("beta1"), fl("beta2")),
                                   fl("eps"), fl("weight_decay"))
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mi in range(accum):
            x = torch.from_numpy(batches[s, mi, 0].astype(np.int64))
            y = torch.from_numpy(batches[s, mi, 1].astype(np.int64))
            loss = model(x, y)
            (loss / accum).backward()
            total += loss.item()
        losses.append(total / accum)
        if fl("grad_clip") > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), fl("grad_clip"))
        lr = torch_gpt.learning_rate(s, i("total_steps"), i("warmup"), fl("lr"), fl("min_lr"))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    with open(os.path.join(d, "torch_losses.txt"), "w") as f:
        f.write("\n".join(f"{x:.9g}" for x in losses) + "\n")
    torch_gpt.flatten(model, manifest).tofile(os.path.join(d, "torch_final.bin"))


if __name__ == "__main__":
    main(sys.argv[1])
