"""Small GGUF models of one tensor type each, for the device speed benchmark (llama/speed.py).

A node does not have the model it will serve, so it measures its speed on models of the types real
models use (f16, q8_0, q4_K, ...) and announces nanoseconds per byte for each.

The files are sparse: a header and the tensor table, then a hole where the weights would be. Zero
weights (and zero scales) compute exactly as fast as real ones (no kernel skips zeros, and zeros
are no NaN), so nothing needs generating or writing: a 128 MiB model costs a few kilobytes and a
millisecond. llama-bench must then load it with `-lm none` (read, not mmap): mapped, every page
of a hole is the kernel's one zero page, and the weights would sit in the cache instead of
streaming from memory as a real model's do.

Shape: llama architecture, width 1024 (8 heads of 128), feed-forward 2816 (both multiples of 256,
the K-quants' block), 259 tokens (the minimal SentencePiece vocabulary of bench/big_model.py), so
almost all the time per token is the layers' matrix-vector products.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

WIDTH = 1024
FFN = 2816
HEAD = 128
BENCH_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K", "IQ4_NL", "IQ4_XS")
ALIGN = 32                      # GGUF's default data alignment


def tensor_bytes(kind: str, n: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return n // block * size


def layer_bytes(kind: str, width: int = WIDTH, ffn: int = FFN) -> int:
    """The weights of one layer of `kind`: four width x width attention matrices and three of the
    feed-forward."""
    return tensor_bytes(kind, 4 * width * width + 3 * width * ffn)


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write(path: Path, kind: str, n_layers: int = 2, width: int = WIDTH, ffn: int = FFN) -> int:
    """Write a model whose layer matrices are all `kind`; returns the bytes of its layers' weights."""
    import gguf

    if kind not in BENCH_TYPES:
        raise ValueError(f"tensor type {kind} cannot be benchmarked; types: {', '.join(BENCH_TYPES)}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    heads = max(1, width // HEAD)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synapticllamas-speed-{kind.lower()}")
    w.add_context_length(512)
    w.add_embedding_length(width)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(width // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    qtype = gguf.GGMLQuantizationType[kind]
    data = 0
    layers = 0

    def tensor(name: str, rows: int, cols: int, of: str) -> int:
        nonlocal data
        if of in ("F32", "F16"):
            dtype = np.dtype(np.float32 if of == "F32" else np.float16)
            nbytes = rows * cols * dtype.itemsize
            w.add_tensor_info(name, (rows, cols) if rows > 1 else (cols,), dtype, nbytes)
        else:
            nbytes = tensor_bytes(of, rows * cols)
            w.add_tensor_info(name, (rows, nbytes // rows), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        data += _pad(nbytes)
        return nbytes

    tensor("token_embd.weight", len(tokens), width, "F16")
    for i in range(n_layers):
        b = f"blk.{i}"
        tensor(f"{b}.attn_norm.weight", 1, width, "F32")
        layers += sum(tensor(f"{b}.{name}.weight", width, width, kind)
                      for name in ("attn_q", "attn_k", "attn_v", "attn_output"))
        tensor(f"{b}.ffn_norm.weight", 1, width, "F32")
        layers += tensor(f"{b}.ffn_gate.weight", ffn, width, kind) + tensor(f"{b}.ffn_up.weight", ffn, width, kind)
        layers += tensor(f"{b}.ffn_down.weight", width, ffn, kind)
    tensor("output_norm.weight", 1, width, "F32")
    tensor("output.weight", len(tokens), width, "F16")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    # the data section: from the next aligned offset, all of it a hole
    with open(path, "r+b") as fh:
        os.ftruncate(fh.fileno(), _pad(os.fstat(fh.fileno()).st_size) + data)
    return layers
