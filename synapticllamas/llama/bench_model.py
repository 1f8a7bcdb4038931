"""Small GGUF models of one tensor type each, for the device speed benchmark (llama/speed.py).

A node does not have the model it will serve, so it measures its speed on models of the types real
models use (f16, q8_0, q4_K, ...) and announces nanoseconds per byte for each.

The files are sparse: a header and the tensor table, then a hole where the weights would be. Zero
weights (and zero scales) compute exactly as fast as real ones (no kernel skips zeros, and zeros
are no NaN), so nothing needs generating or writing: a 96 MiB model costs a few kilobytes and a
millisecond. llama-bench must then load it with `-lm none` (read, not mmap): mapped, every page
of a hole is the kernel's one zero page, and the weights would sit in the cache instead of
streaming from memory as a real model's do.

The header is written here, by the GGUF format's rules (version 3, little-endian), not with the
`gguf` package: importing it (and numpy) costs more CPU than the benchmark's runs on a node with a
fifth of a core, and a node's start waits for the benchmark. tests/unit/test_speed_plans.py
reads the files back with llama/gguf_layout.py.

Shape: llama architecture, width 1024 (8 heads of 128), feed-forward 2816 (both multiples of 256,
the K-quants' block), 259 tokens (the minimal SentencePiece vocabulary of bench/big_model.py), so
almost all the time per token is the layers' matrix-vector products.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

WIDTH = 1024
FFN = 2816
HEAD = 128
ALIGN = 32                      # GGUF's default data alignment
# ggml's type ids and (elements, bytes) per block (ggml.h, ggml-common.h)
TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
         "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
         "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "IQ4_NL": (20, 32, 18),
         "IQ4_XS": (23, 256, 136), "BF16": (30, 1, 2)}
BENCH_TYPES = tuple(TYPES)
_U32, _I32, _F32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9


def tensor_bytes(kind: str, n: int) -> int:
    _, block, size = TYPES[kind]
    return n // block * size


def layer_bytes(kind: str, width: int = WIDTH, ffn: int = FFN) -> int:
    """The weights of one layer of `kind`: four width x width attention matrices and three of the
    feed-forward."""
    return tensor_bytes(kind, 4 * width * width + 3 * width * ffn)


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, kind: int, value: Any) -> bytes:
    out = _string(key) + struct.pack("<I", kind)
    if kind == _STRING:
        return out + _string(str(value))
    if kind == _ARRAY:
        item: int = value[0]
        items: list[Any] = value[1]
        out += struct.pack("<IQ", item, len(items))
        if item == _STRING:
            return out + b"".join(_string(s) for s in items)
        fmt = {_I32: "<i", _F32: "<f"}[item]
        return out + b"".join(struct.pack(fmt, v) for v in items)
    return out + struct.pack({_U32: "<I", _F32: "<f", _BOOL: "<?"}[kind], value)


def write(path: Path, kind: str, n_layers: int = 2, width: int = WIDTH, ffn: int = FFN) -> int:
    """Write a model whose layer matrices are all `kind`; returns the bytes of its layers' weights."""
    if kind not in TYPES:
        raise ValueError(f"tensor type {kind} cannot be benchmarked; types: {', '.join(BENCH_TYPES)}")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    heads = max(1, width // HEAD)
    kvs = [_kv("general.architecture", _STRING, "llama"), _kv("general.name", _STRING, f"speed-{kind.lower()}"),
           _kv("llama.context_length", _U32, 512), _kv("llama.embedding_length", _U32, width),
           _kv("llama.block_count", _U32, n_layers), _kv("llama.feed_forward_length", _U32, ffn),
           _kv("llama.attention.head_count", _U32, heads), _kv("llama.attention.head_count_kv", _U32, heads),
           _kv("llama.rope.dimension_count", _U32, width // heads),
           _kv("llama.attention.layer_norm_rms_epsilon", _F32, 1e-5), _kv("llama.vocab_size", _U32, len(tokens)),
           _kv("tokenizer.ggml.model", _STRING, "llama"), _kv("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokens)),
           _kv("tokenizer.ggml.scores", _ARRAY, (_F32, [0.0] * len(tokens))),
           _kv("tokenizer.ggml.token_type", _ARRAY, (_I32, [2, 3, 3] + [6] * 256)),
           _kv("tokenizer.ggml.unknown_token_id", _U32, 0), _kv("tokenizer.ggml.bos_token_id", _U32, 1),
           _kv("tokenizer.ggml.eos_token_id", _U32, 2), _kv("tokenizer.ggml.add_bos_token", _BOOL, True)]
    infos: list[bytes] = []
    offset = 0
    layers = 0

    def tensor(name: str, dims: tuple[int, ...], of: str) -> int:
        """One tensor's entry; dims as GGUF stores them (the row length first)."""
        nonlocal offset
        n = 1
        for d in dims:
            n *= d
        nbytes = tensor_bytes(of, n)
        infos.append(_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", TYPES[of][0], offset))
        offset += _pad(nbytes)
        return nbytes

    tensor("token_embd.weight", (width, len(tokens)), "F16")
    for i in range(n_layers):
        b = f"blk.{i}"
        tensor(f"{b}.attn_norm.weight", (width,), "F32")
        layers += sum(tensor(f"{b}.{name}.weight", (width, width), kind)
                      for name in ("attn_q", "attn_k", "attn_v", "attn_output"))
        tensor(f"{b}.ffn_norm.weight", (width,), "F32")
        layers += tensor(f"{b}.ffn_gate.weight", (width, ffn), kind) + tensor(f"{b}.ffn_up.weight", (width, ffn), kind)
        layers += tensor(f"{b}.ffn_down.weight", (ffn, width), kind)
    tensor("output_norm.weight", (width,), "F32")
    tensor("output.weight", (width, len(tokens)), "F16")
    header = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    with open(path, "wb") as fh:
        fh.write(header)
        # the data section: from the next aligned offset, all of it a hole
        os.ftruncate(fh.fileno(), _pad(len(header)) + offset)
    return layers
