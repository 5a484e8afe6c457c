"""PyTorch side of tests/safetensors_test.cc (HfGpt2.ExportMatchesPyTorchGpt2AndImportIsBitExact).

Usage: safetensors_torch.py MODEL.safetensors BATCH.bin B T OUT_DIR

Reads a GPT-2 safetensors file with json + numpy only (the `safetensors` package is not in
Debian 12), builds GPT-2 the way Hugging Face names and lays it out -- independently of Strata's
code and of scripts/torch_gpt.py: Conv1D weights [in, out] (y = x @ W + b), pre-LN blocks with
LayerNorm eps 1e-5, causal attention, GELU (tanh approximation), LM head tied to wte -- and
computes in float64 the mean cross-entropy of the batch (int32 inputs [B, T] then targets
[B, T]). Writes OUT_DIR/torch_loss.txt, and OUT_DIR/torch_export.safetensors: the same float32
weights written the way HF GPT-2 checkpoints look (no "transformer." prefix, a tied
"lm_head.weight", the "h.{l}.attn.bias" / "attn.masked_bias" buffers), for Strata to import.
"""
import json
import math
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {}
    for name, info in header.items():
        np_dtype, size = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        assert end - begin == size * int(np.prod(shape, dtype=np.int64)), name
        a = np.frombuffer(data[begin:end], dtype=np.dtype(np_dtype).newbyteorder("<"))
        if info["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = a.astype(np.float32).reshape(shape)
    return tensors, meta


def write_safetensors(path, tensors, meta):
    """tensors: name -> float32 array. Sorted by name, like the reference writer."""
    header, blobs, offset = {"__metadata__": meta}, [], 0
    for name in sorted(tensors):
        b = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode("utf-8")  # default ", " / ": " separators
    h += b" " * (-(8 + len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def gpt2_loss(w, cfg, idx, targets):
    """w: HF name without prefix -> float64 tensor."""
    c, nh = cfg["n_embd"], cfg["n_head"]
    hs = c // nh
    b, t = idx.shape
    x = w["wte.weight"][idx] + w["wpe.weight"][torch.arange(t)]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for layer in range(cfg["n_layer"]):
        p = f"h.{layer}."

        def ln(v, name):
            return F.layer_norm(v, (c,), w[p + name + ".weight"], w[p + name + ".bias"], eps=1e-5)

        def conv1d(v, name):  # HF Conv1D: weight [in, out]
            return v @ w[p + name + ".weight"] + w[p + name + ".bias"]

        q, k, v = conv1d(ln(x, "ln_1"), "attn.c_attn").split(c, dim=2)
        q, k, v = (z.view(b, t, nh, hs).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + conv1d(y, "attn.c_proj")
        hmid = F.gelu(conv1d(ln(x, "ln_2"), "mlp.c_fc"), approximate="tanh")
        x = x + conv1d(hmid, "mlp.c_proj")
    x = F.layer_norm(x, (c,), w["ln_f.weight"], w["ln_f.bias"], eps=1e-5)
    logits = x @ w["wte.weight"].t()  # tied head
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def main():
    model_path, batch_path, b, t, out_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
        int(sys.argv[4]), sys.argv[5]
    tensors, meta = read_safetensors(model_path)
    assert meta.get("format") == "pt", meta
    cfg = {k: int(meta[k]) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions")}
    prefix = "transformer."
    assert all(n.startswith(prefix) for n in tensors), sorted(tensors)
    w32 = {n[len(prefix):]: a for n, a in tensors.items()}
    c = cfg["n_embd"]
    assert w32["wte.weight"].shape == (cfg["vocab_size"], c)
    assert w32["wpe.weight"].shape == (cfg["n_positions"], c)
    assert w32["h.0.attn.c_attn.weight"].shape == (c, 3 * c)
    assert w32["h.0.mlp.c_proj.weight"].shape == (4 * c, c)
    assert len(w32) == 2 + 12 * cfg["n_layer"] + 2, sorted(w32)

    batch = np.fromfile(batch_path, dtype="<i4")
    assert batch.size == 2 * b * t, batch.size
    idx = torch.from_numpy(batch[:b * t].reshape(b, t).astype(np.int64))
    targets = torch.from_numpy(batch[b * t:].reshape(b, t).astype(np.int64))
    w = {n: torch.from_numpy(a).double() for n, a in w32.items()}
    with torch.no_grad():
        loss = gpt2_loss(w, cfg, idx, targets).item()
    print(f"torch loss {loss:.8f}")
    with open(f"{out_dir}/torch_loss.txt", "w") as f:
        f.write(f"{loss:.10f}\n")

    out = dict(w32)
    out["lm_head.weight"] = w32["wte.weight"]
    n_pos = cfg["n_positions"]
    for layer in range(cfg["n_layer"]):
        out[f"h.{layer}.attn.bias"] = np.tril(np.ones((n_pos, n_pos), np.float32))[None, None]
        out[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    write_safetensors(f"{out_dir}/torch_export.safetensors", out, {"format": "pt"})


if __name__ == "__main__":
    main()
