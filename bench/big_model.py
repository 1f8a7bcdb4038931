#!/usr/bin/env python3
"""A GGUF of llama architecture with random weights, for the cold vs warm model-load benchmark.

    .venv/bin/python bench/big_model.py OUT.gguf [--layers 5] [--width 2560] [--ffn N] [--dtype f16] [--seed 0]

Why: ggml-rpc-server with `-c` caches a tensor only if it is bigger than a threshold, and the
demo model's tensors are mostly small (of its 92 MiB only the 28 MiB embedding gets cached), so it
cannot show what the cache saves. This model's weight matrices are all above the threshold.

The size rule, measured with this llama.cpp build (rpc-server v7.0.0; tests/integration/
test_big_model.py checks it on every run): a tensor is cached when its size in bytes is strictly
greater than 10 MiB (10485760 bytes, upstream's HASH_THRESHOLD); a tensor of exactly 10 MiB is not.
The cache file is named by a hash of the data (`[set_tensor] saved to '<dir>/<16 hex digits>'`), so
identical tensors share one file: every tensor here gets its own random data, and a different
`seed` gives a model none of whose tensors are in the cache (a cold load without clearing it).
For f16 a square width x width matrix is cached from width 2304 on (2304^2 * 2 bytes = 10.1 MiB);
width 2048 (8 MiB attention matrices) would leave the attention, a third to a half of each layer, uncached.

Defaults: 5 layers of width 2560, feed-forward 4096, 20 heads of 128, f16: 110 MiB a layer,
553 MiB in all, 99.5 % of it in the 35 tensors above the threshold. Why 5: llama-server (-ngl 99)
splits n_layers + 1 slots (the output layer is one) among the RPC devices by their free memory, so
three equal nodes get 2/1/0 layers of a 3-layer model, 2/2/0 of 4, 2/2/1 (and the output) of 5
(measured over three simulated hosts). The feed-forward width is 1.6x rather than the usual 2.7x
to keep five layers at a few hundred MB. Over one 100 Mbit/s link that is ~46 s of transfer: a
3-layer variant (456 MiB) loaded cold in 42 s and warm in 2.2 s over three 100 Mbit/s hosts.

The vocabulary is the minimum a llama (SentencePiece) tokenizer loads with: <unk>, <s>, </s> and the
256 byte tokens, so any text tokenizes (byte fallback). The text it writes is noise.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RPC_CACHE_THRESHOLD = 10 * 1024 * 1024      # rpc-server -c caches tensors of more than this many bytes
HEAD_DIM = 128


@dataclass
class ModelInfo:
    path: Path
    n_layers: int
    width: int
    ffn: int
    dtype: str
    tensors: dict[str, int] = field(default_factory=dict)      # name -> bytes, in file order

    @property
    def tensor_bytes(self) -> int:
        return sum(self.tensors.values())

    @property
    def cacheable(self) -> dict[str, int]:
        """The tensors rpc-server's cache keeps (if they are placed on an RPC device)."""
        return {name: n for name, n in self.tensors.items() if n > RPC_CACHE_THRESHOLD}

    def summary(self) -> str:
        mib = 1024 * 1024
        cached = sum(self.cacheable.values())
        return (f"{self.path}: llama, {self.n_layers} layers of width {self.width} (ffn {self.ffn}), {self.dtype}, "
                f"{len(self.tensors)} tensors, {self.tensor_bytes / mib:.1f} MiB; "
                f"{len(self.cacheable)} tensors > {RPC_CACHE_THRESHOLD // mib} MiB hold {cached / mib:.1f} MiB "
                f"({100 * cached / self.tensor_bytes:.1f} %)")


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their types (gguf TokenType: 2 unknown, 3 control, 6 byte)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    return tokens, [2, 3, 3] + [6] * 256


def layout(n_layers: int, width: int, ffn: int, n_kv_heads: int, n_vocab: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, numpy shape, is a matrix) of every tensor, in file order. Shapes are numpy's (rows, cols):
    GGUF stores them reversed, and llama.cpp reads attn_q as {width, width}, ffn_up as {width, ffn}."""
    kv = n_kv_heads * HEAD_DIM
    out = [("token_embd.weight", (n_vocab, width), True)]
    for i in range(n_layers):
        b = f"blk.{i}"
        out += [(f"{b}.attn_norm.weight", (width,), False),
                (f"{b}.attn_q.weight", (width, width), True),
                (f"{b}.attn_k.weight", (kv, width), True),
                (f"{b}.attn_v.weight", (kv, width), True),
                (f"{b}.attn_output.weight", (width, width), True),
                (f"{b}.ffn_norm.weight", (width,), False),
                (f"{b}.ffn_gate.weight", (ffn, width), True),
                (f"{b}.ffn_up.weight", (ffn, width), True),
                (f"{b}.ffn_down.weight", (width, ffn), True)]
    return [*out, ("output_norm.weight", (width,), False), ("output.weight", (n_vocab, width), True)]


def write_model(path: str | Path, n_layers: int = 5, width: int = 2560, ffn: int | None = None,
                n_kv_heads: int | None = None, dtype: str = "f16", seed: int = 0, context: int = 2048) -> ModelInfo:
    """Write the model to `path` and say what is in it. `width` must be a multiple of 128 (the head size);
    `ffn` defaults to 1.6 x width rounded up to 256, `n_kv_heads` to all heads (no grouped-query attention)."""
    import gguf

    if width % HEAD_DIM or width <= 0:
        raise ValueError(f"width must be a positive multiple of {HEAD_DIM}")
    if dtype not in ("f16", "f32"):
        raise ValueError("dtype must be f16 or f32")
    n_heads = width // HEAD_DIM
    n_kv_heads = n_kv_heads or n_heads
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} heads cannot share {n_kv_heads} key/value heads")
    ffn = ffn or -(-int(width * 1.6) // 256) * 256
    matrix_type = np.float16 if dtype == "f16" else np.float32
    tokens, types = vocabulary()
    path = Path(path)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("synapticllamas-bench-random")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(context)
    w.add_embedding_length(width)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)

    # Tensor infos first, then the data one tensor at a time: a few hundred MB never sit in memory.
    specs = layout(n_layers, width, ffn, n_kv_heads, len(tokens))
    info = ModelInfo(path, n_layers, width, ffn, dtype)
    for name, shape, matrix in specs:
        t = np.dtype(matrix_type if matrix else np.float32)      # norms stay f32, as llama.cpp expects
        nbytes = int(np.prod(shape)) * t.itemsize
        w.add_tensor_info(name, shape, t, nbytes)
        info.tensors[name] = nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(width)             # keeps activations finite through random layers
    for _, shape, matrix in specs:
        if matrix:
            data = ((rng.random(shape, dtype=np.float32) - 0.5) * (2 * scale)).astype(matrix_type)
        else:
            data = np.ones(shape, dtype=np.float32)
        w.write_tensor_data(data)
    w.close()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--dtype", choices=("f16", "f32"), default="f16")
    ap.add_argument("--seed", type=int, default=0, help="another seed: another model, none of it in a cache")
    args = ap.parse_args(argv)
    try:
        info = write_model(args.out, args.layers, args.width, args.ffn, args.kv_heads, args.dtype, args.seed)
    except (ValueError, OSError) as exc:
        print(f"big_model: {exc}", file=sys.stderr)
        return 2
    print(info.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
