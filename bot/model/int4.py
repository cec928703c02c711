"""The official chatglm2-6b-int4 weight format: quantize, pack, unpack, dequantize.

Per quantized linear the checkpoint holds ``weight`` int8 ``[out, in/2]``, two signed 4-bit values
per byte (even column in the high nibble), and ``weight_scale`` fp16 ``[out]``; the weight is
``q * scale``. Quantizing follows the official ``quantize(4)``: fp16 math, ``scale = max|w| / 7``,
``q = round(w / scale)`` (an all-zero row has scale 0 and q 0). The one home of this arithmetic:
quant.py, the kernel layer and bench/make_checkpoint.py use it.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 4096  # rows converted at once (a multiple of 64): bounds the temporaries


def pack(q: torch.Tensor) -> torch.Tensor:
    """Integer values in [-8, 7] ``[out, in]`` (any integer or integral float dtype) -> int8
    ``[out, in/2]``: ``(q[:, 2j] << 4) | (q[:, 2j+1] & 0xF)``."""
    q16 = q.to(torch.int16)
    packed = ((q16[:, 0::2] << 4) | (q16[:, 1::2] & 0xF)) & 0xFF
    return packed.to(torch.uint8).view(torch.int8)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int8 ``[out, in/2]`` -> int8 ``[out, in]`` (signed 4-bit values, arithmetic shifts)."""
    high = packed >> 4
    low = (packed << 4) >> 4  # sign-extends the low nibble
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` as ``dtype`` (exact in float32: 4-bit times an fp16 scale)."""
    return (unpack(packed).to(dtype) * scale.to(dtype)[:, None]).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[out, in]`` -> (packed int8 ``[out, in/2]``, fp16 scale ``[out]``), official arithmetic."""
    if weight.dim() != 2 or weight.shape[1] % 2:
        raise ValueError(
            f"int4 quantization needs a 2-D weight with an even column count, got {weight.shape}"
        )
    packed = torch.empty(weight.shape[0], weight.shape[1] // 2, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float16)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        w16 = weight[start:stop].to(torch.float16)
        scale[start:stop] = w16.abs().max(dim=-1).values / 7  # fp16 math, as the official code
        q = torch.round(w16 / scale[start:stop, None]).nan_to_num_(0.0).to(torch.int8)  # 0/0 -> 0
        packed[start:stop] = pack(q)
    return packed, scale


def quantize_terms(weight: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as a sum of ``terms`` int4 matrices, stacked by rows: (int8 ``[terms*out, in/2]``,
    fp16 scale ``[terms*out]``). The first term is ``quantize(weight)``; each next one quantizes what
    the previous ones left out. One per-row term moves a weight by up to half a step (max|w| / 14);
    two terms shrink that ~14x, to about int8 precision, at twice the int4 bytes (still half of
    bf16). For the output layer, whose errors go straight into the logits."""
    rows, columns = weight.shape
    packed = torch.empty(terms, rows, columns // 2, dtype=torch.int8)
    scale = torch.empty(terms, rows, dtype=torch.float16)
    for start in range(0, rows, CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        residual = weight[start:stop].to(torch.float32, copy=True)
        for term in range(terms):
            packed[term, start:stop], scale[term, start:stop] = quantize(residual)
            residual -= dequantize(packed[term, start:stop], scale[term, start:stop], torch.float32)
    return packed.view(terms * rows, columns // 2), scale.view(terms * rows)
