"""Tiny GGUF models of one tensor type each, for the device speed benchmark (llama/speed.py).

A node does not have the model it will serve, so it measures its speed on small models of the
types real models use (f16, q8_0, q4_K, ...) and announces seconds per byte for each. The weights
are random bytes with every block's scales set to a small finite f16, so no kernel meets a NaN or
an infinity (the kernels' speed does not depend on the values otherwise, and random bytes cost
nothing to make, where quantising real numbers in numpy would take seconds).

Shape: llama architecture, width 1024 (8 heads of 128), feed-forward 2816 (both multiples of 256,
the K-quants' block), 259 tokens (the minimal SentencePiece vocabulary of bench/big_model.py), so
almost all the time per token is the layers' matrix-vector products.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH = 1024
FFN = 2816
HEAD = 128
# byte offsets of the f16 scale fields inside one block, per type (ggml-common.h's block structs)
SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
PLAIN = {"F16": np.float16, "F32": np.float32}
BENCH_TYPES = tuple(PLAIN) + tuple(SCALES)
SMALL = np.float16(0.01).tobytes()


def tensor_bytes(kind: str, n: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return n // block * size


def _data(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random weights of `kind` for a (rows, cols) matrix, as the bytes GGUF stores."""
    rows, cols = shape
    if kind == "F16":
        # random bits with the exponent's top bit cleared: finite values below 2, never inf or NaN
        bits = np.frombuffer(rng.bytes(rows * cols * 2), dtype=np.uint16) & np.uint16(0x3BFF)
        return bits.view(np.float16).reshape(rows, cols)
    if kind == "F32":
        return (rng.random(shape, dtype=np.float32) - 0.5) * np.float32(2 / np.sqrt(cols))
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    data = np.frombuffer(rng.bytes(rows * cols // block * size), dtype=np.uint8).reshape(rows, cols // block, size)
    data = data.copy()
    for offset in SCALES[kind]:
        data[:, :, offset:offset + 2] = np.frombuffer(SMALL, dtype=np.uint8)
    return data.reshape(rows, cols // block * size)


def layer_bytes(kind: str, width: int = WIDTH, ffn: int = FFN) -> int:
    """The weights of one layer of `kind`: four width x width attention matrices and three of the
    feed-forward."""
    return tensor_bytes(kind, 4 * width * width + 3 * width * ffn)


def write(path: Path, kind: str, n_layers: int = 2, width: int = WIDTH, ffn: int = FFN, seed: int = 0) -> int:
    """Write a model whose layer matrices are all `kind`; returns the bytes of its layers' weights."""
    import gguf

    if kind not in BENCH_TYPES:
        raise ValueError(f"tensor type {kind} cannot be benchmarked; types: {', '.join(BENCH_TYPES)}")
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    heads = max(1, width // HEAD)
    head = width // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synapticllamas-speed-{kind.lower()}")
    w.add_context_length(512)
    w.add_embedding_length(width)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * 256)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    raw = None if kind in PLAIN else gguf.GGMLQuantizationType[kind]
    layers = 0

    def matrix(name: str, rows: int, cols: int) -> int:
        data = _data(kind, (rows, cols), rng)
        w.add_tensor(name, data, raw_dtype=raw)     # a quantised shape is read from its bytes
        return int(data.nbytes)

    ones = np.ones(width, dtype=np.float32)
    w.add_tensor("token_embd.weight", _data("F16", (len(tokens), width), rng))
    for i in range(n_layers):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", ones)
        layers += sum(matrix(f"{b}.{name}.weight", width, width) for name in ("attn_q", "attn_k", "attn_v", "attn_output"))
        w.add_tensor(f"{b}.ffn_norm.weight", ones)
        layers += matrix(f"{b}.ffn_gate.weight", ffn, width) + matrix(f"{b}.ffn_up.weight", ffn, width)
        layers += matrix(f"{b}.ffn_down.weight", width, ffn)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", _data("F16", (len(tokens), width), rng))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return layers
