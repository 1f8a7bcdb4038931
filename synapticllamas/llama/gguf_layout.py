"""What a GGUF model holds, for placement: tensor bytes per layer, output and embedding, and the
hyper-parameters the KV cache size depends on.

The format's constants (tensor types and their block sizes) come from the `gguf` package. Its
GGUFReader is not used: it turns every metadata value into numpy views, and the tokenizer's ~100k
strings cost it 3 s on the 98 MB demo model, on every `coordinator start`. Placement needs only
the scalar metadata and the tensor table, so this reads the header, skips arrays by their lengths,
and reads the tensor infos: about 50 ms, nothing of the tensor data. Results are cached per file
(path, size, mtime).
"""
from __future__ import annotations

import mmap
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

_BLOCK = re.compile(r"^blk\.(\d+)\.")
# GGUF value types: size of the fixed-width ones (8 = string, 9 = array)
_FIXED = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
          7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF this reader understands; one line."""


@dataclass(frozen=True)
class ModelLayout:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int             # per head
    value_length: int
    n_vocab: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]     # weights of blk.<i>.*
    output_bytes: int                # output.weight (+ output_norm): what the output layer's device holds
    embd_bytes: int                  # token_embd.weight: stays with the CPU; tied output gets a copy
    tied_output: bool                # no output.weight: the output device holds a copy of token_embd
    total_bytes: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # bytes of each tensor type (F16, Q4_K, ...) in each layer, and in the output layer: what the
    # speed of a device is measured per (llama/speed.py)
    layer_types: tuple[dict[str, int], ...] = field(default=(), compare=False)
    output_types: dict[str, int] = field(default_factory=dict, compare=False)

    def kv_bytes_per_layer(self, n_ctx: int) -> int:
        """K and V in f16 (llama.cpp's default cache type) for n_ctx cells of one layer."""
        return n_ctx * self.n_head_kv * (self.key_length + self.value_length) * 2


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str, size: int) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q", 8)
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return text

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, kind: int) -> Any:
        if kind in _FIXED:
            return self.take(*_FIXED[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.take("<I", 4), self.take("<Q", 8)
            if item in _FIXED:                      # numbers: skipped in one step
                self.pos += n * _FIXED[item][1]
            elif item == _STRING:                   # the tokenizer: lengths only, never decoded
                for _ in range(n):
                    self.skip_string()
            else:
                for _ in range(n):
                    self.value(item)
            return n                                 # arrays stand for their length
        raise GGUFError(f"unknown metadata value type {kind}")


def _tensor_bytes(kind: int, dims: list[int]) -> tuple[int, str]:
    """Its size in bytes, and its type's name."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFError(f"unknown tensor type {kind}") from None
    n = 1
    for d in dims:
        n *= d
    return n // block * size, qtype.name


def read_layout(path: Path) -> ModelLayout:
    st = path.stat()
    return _read(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _read(path: str, size: int, mtime_ns: int) -> ModelLayout:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        try:
            if c.take("<4s", 4) != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file")
            version = c.take("<I", 4)
            if version < 2:
                raise GGUFError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
            n_tensors, n_kv = c.take("<Q", 8), c.take("<Q", 8)
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = c.string()
                meta[key] = c.value(c.take("<I", 4))
            layers: dict[int, int] = defaultdict(int)
            types: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            output_types: dict[str, int] = defaultdict(int)
            embd_type = "F16"
            output = embd = total = 0
            has_output = False
            for _ in range(n_tensors):
                name = c.string()
                dims = [c.take("<Q", 8) for _ in range(c.take("<I", 4))]
                kind = c.take("<I", 4)
                c.take("<Q", 8)                                    # its offset in the data section
                nbytes, type_name = _tensor_bytes(kind, dims)
                total += nbytes
                if (hit := _BLOCK.match(name)):
                    layers[int(hit.group(1))] += nbytes
                    types[int(hit.group(1))][type_name] += nbytes
                elif name.startswith("output"):
                    output += nbytes
                    output_types[type_name] += nbytes
                    has_output = has_output or name == "output.weight"
                elif name == "token_embd.weight":
                    embd, embd_type = nbytes, type_name
        except struct.error:
            raise GGUFError(f"{path} ends in the middle of its header: a partial download?") from None
    arch = str(meta.get("general.architecture", ""))

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path} has no {arch}.{key}: placement cannot size it")
        return int(value)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    n_head_kv = number("attention.head_count_kv", n_head)
    head = n_embd // max(1, n_head)
    if not has_output:             # tied: the output layer multiplies by a copy of the embedding
        output_types[embd_type] += embd
    return ModelLayout(
        architecture=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        key_length=number("attention.key_length", head), value_length=number("attention.value_length", head),
        n_vocab=int(meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens") or 0),
        n_ctx_train=number("context_length", 4096),
        layer_bytes=tuple(layers.get(i, 0) for i in range(n_layer)),
        output_bytes=output + (0 if has_output else embd), embd_bytes=embd, tied_output=not has_output,
        total_bytes=total, layer_types=tuple(dict(types.get(i, {})) for i in range(n_layer)),
        output_types=dict(output_types))
