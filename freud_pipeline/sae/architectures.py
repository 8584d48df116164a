"""Architecture name -> class, the one place that knows every SAE variant."""

from __future__ import annotations

from freud_pipeline.sae.base import SparseAutoencoder
from freud_pipeline.sae.batchtopk import BatchTopKSAE
from freud_pipeline.sae.jumprelu import JumpReLUSAE
from freud_pipeline.sae.l1 import L1SAE
from freud_pipeline.sae.matryoshka import MatryoshkaBatchTopKSAE
from freud_pipeline.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (TopKSAE, L1SAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE)
}


def architecture_class(name: str) -> type[SparseAutoencoder]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown SAE architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None
