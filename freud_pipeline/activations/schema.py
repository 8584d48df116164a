"""The shard format. One row per real encoder frame (20 ms); one FixedSizeList column per hook.

A shard is one Arrow IPC file holding one record batch of whole clips, so a killed run loses at most the
shard being written and a clip is never split across files. Padding frames are never stored.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from freud_pipeline import __version__

FORMAT_VERSION = 1
DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
WINDOW_MODES = ("padded", "trimmed", "packed")


def column_name(hook: str) -> str:
    return f"act:{hook}"


def sparse_columns(hook: str) -> tuple[str, str]:
    """Columns of a sparse (top-k) hook: the k values and their int32 latent indices per frame."""
    return f"val:{hook}", f"idx:{hook}"


@dataclass(frozen=True)
class ShardSpec:
    """Everything that determines the content of a shard set; its fingerprint decides reuse."""

    model: str
    model_sha256: str
    hooks: tuple[str, ...]
    widths: tuple[int, ...]
    dtype: str = "float16"
    window_mode: str = "padded"
    source: str = ""  # e.g. "whisper" or "sae:<run id>"
    sparse_k: int = 0  # > 0: each frame stores only its k largest values and their indices (TopK SAE latents)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not supported; choose one of {', '.join(DTYPES)}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window mode {self.window_mode!r} unknown; choose one of {', '.join(WINDOW_MODES)}")

    def schema(self) -> pa.Schema:
        fields = [pa.field("clip_id", pa.string()), pa.field("frame", pa.int32())]
        for hook, width in zip(self.hooks, self.widths):
            if self.sparse_k:
                values, indices = sparse_columns(hook)
                fields += [pa.field(values, pa.list_(DTYPES[self.dtype], self.sparse_k)),
                           pa.field(indices, pa.list_(pa.int32(), self.sparse_k))]
            else:
                fields.append(pa.field(column_name(hook), pa.list_(DTYPES[self.dtype], width)))
        meta = {
            "freud.format_version": str(FORMAT_VERSION),
            "freud.code_version": __version__,
            "freud.spec": json.dumps(self.to_json(), sort_keys=True),
        }
        return pa.schema(fields, metadata=meta)

    def to_json(self) -> dict:
        data = asdict(self)
        data["hooks"], data["widths"] = list(self.hooks), list(self.widths)
        return data

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> "ShardSpec":
        data = json.loads(schema.metadata[b"freud.spec"])
        data["hooks"], data["widths"] = tuple(data["hooks"]), tuple(data["widths"])
        return cls(**data)
