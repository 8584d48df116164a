"""SAE latents as shards: the original's `sae_model` collection configs. TopK latents are stored sparse
(k values + int32 indices per frame), other architectures dense."""

from pathlib import Path

import numpy as np
import torch

from freud_pipeline.activations.schema import ShardSpec
from freud_pipeline.activations.writer import ShardWriter, is_complete


def collect_sae_latents(source, sae, out_dir: Path, *, hook: str, sae_run_id: str = "", dtype: str = "float16",
                        batch_frames: int = 8192) -> dict:
    """Encode every clip of `source` (an ActivationReader or StreamingActivations) at `hook` with `sae`."""
    k = int(getattr(sae, "k", 0)) if getattr(sae, "architecture", "") == "topk" else 0
    reader_spec = getattr(source, "spec", None)
    spec = ShardSpec(
        model=reader_spec.model if reader_spec else getattr(sae, "metadata", {}).get("model_name", ""),
        model_sha256=reader_spec.model_sha256 if reader_spec else "",
        hooks=(f"{hook}/latents",), widths=(int(sae.n_latents),), dtype=dtype,
        window_mode=reader_spec.window_mode if reader_spec else "padded", source=f"sae:{sae_run_id}", sparse_k=k,
    )
    fingerprint = f"{sae_run_id}:{(source.manifest or {}).get('input_fingerprint', '') if reader_spec else ''}"
    if is_complete(out_dir, spec, fingerprint):
        import json

        return json.loads((Path(out_dir) / "shards.json").read_text()) | {"reused": True}
    writer = ShardWriter(out_dir, spec, input_fingerprint=fingerprint)
    name = spec.hooks[0]
    device = next(sae.parameters()).device
    for clip_id, acts in source.iter_clips(hook, dtype=np.float32):
        if clip_id in writer.done:
            continue
        with torch.inference_mode():
            latents = torch.cat([sae.encode(torch.from_numpy(acts[i : i + batch_frames]).to(device))
                                 for i in range(0, len(acts), batch_frames)]).float().cpu()
        frames = np.arange(len(acts), dtype=np.int32)
        if k:
            values, indices = latents.topk(k, dim=-1)
            writer.add(clip_id, frames, {name: (values.numpy(), indices.numpy().astype(np.int32))})
        else:
            writer.add(clip_id, frames, {name: latents.numpy()})
    return writer.close(extra_metadata={"reused": False, "sae_run_id": sae_run_id})
