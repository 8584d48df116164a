"""Training configuration of an SAE run. Every field is logged to MLflow as a parameter."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

_K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")  # those keeping k latents per frame


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    architecture: Literal["topk", "l1", "batchtopk", "jumprelu", "matryoshka_batchtopk"] = "topk"
    hook: str
    model_name: str | None = None  # Whisper model the activations came from; defaults to source.model_name
    expansion_factor: PositiveInt = 16
    n_latents: PositiveInt | None = None  # overrides expansion_factor
    k: PositiveInt = 32  # topk, batchtopk, matryoshka_batchtopk
    k_aux: PositiveInt | None = None  # None: d_in // 2
    auxk_alpha: float = Field(1 / 32, ge=0)
    dead_after_frames: PositiveInt = 1_000_000
    l1_alpha: float = Field(10.0, ge=0)  # l1; 1e-3 of recon_alpha, the ratio of er537's L1 and MSE weights
    recon_alpha: PositiveFloat = 1e4  # l1
    threshold_decay: float = Field(0.99, ge=0, lt=1)  # batchtopk, matryoshka_batchtopk
    # jumprelu: loss = FVU + l0_coefficient * penalty; the penalty is (L0 / l0_target - 1)^2, or L0 itself when
    # l0_target is None (then l0_coefficient is per latent, ~1e-3). jumprelu_bandwidth: the straight-through
    # estimator's kernel width, in scaled-input units (freud_pipeline/sae/jumprelu.py).
    l0_coefficient: float = Field(1.0, ge=0)
    l0_target: PositiveFloat | None = 32.0
    jumprelu_bandwidth: PositiveFloat = 0.05
    # matryoshka_batchtopk: the nested prefixes each trained to reconstruct alone; a value <= 1 is a fraction of
    # the latents, > 1 a number of latents; the full dictionary is always the last (freud_pipeline/sae/matryoshka.py).
    matryoshka_prefixes: list[PositiveFloat] = [1 / 16, 1 / 4, 1.0]
    normalize_inputs: bool = True  # rescale to mean norm sqrt(d_in) while training; folded into the weights
    scale_batches: PositiveInt = 4  # batches the input scale and b_dec init are estimated from

    lr: PositiveFloat = 4e-4
    optimiser: Literal["adam", "radam"] = "adam"
    optimiser_eps: PositiveFloat = 1e-8  # Adam's/RAdam's eps (PyTorch's default); the original FREUD L1 recipe: 1e-5
    schedule: Literal["linear-warmup", "cosine"] = "cosine"  # both warm up linearly; cosine then decays to 0
    warmup_steps: int = Field(100, ge=0)
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 4096  # frames
    grad_clip: PositiveFloat | None = 1.0
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0

    eval_every: int = Field(500, ge=0)  # 0: only at the end
    eval_batches: PositiveInt = 8
    log_every: PositiveInt = 10
    checkpoint_every: int = Field(0, ge=0)  # 0: only the final checkpoint
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True  # autocast to bfloat16; applied on CUDA only

    @model_validator(mode="after")
    def _k_fits(self) -> "TrainConfig":
        if self.n_latents is not None and self.architecture in _K_ARCHITECTURES and self.k > self.n_latents:
            raise ValueError(f"k ({self.k}) cannot exceed n_latents ({self.n_latents})")
        return self

    @model_validator(mode="after")
    def _prefixes_nest(self) -> "TrainConfig":
        p = self.matryoshka_prefixes
        if any(b <= a for a, b in zip(p, p[1:])) or any(v > 1 and not float(v).is_integer() for v in p):
            raise ValueError(f"matryoshka_prefixes must increase strictly, as fractions <= 1 then whole latent "
                             f"counts; got {p}")
        return self

    def latents_for(self, d_in: int) -> int:
        return self.n_latents or self.expansion_factor * d_in


def demo_config(**overrides) -> TrainConfig:
    """The demo SAE: TopK 16x (6144 latents), k=64 on tiny.en encoder.blocks.2, 800 steps of 2048 frames, cosine
    lr 1e-3, a checkpoint at step 400. What `make demo` trains (the topk_sae asset's defaults) and
    configs/train/demo_topk.yaml holds (that file also sets device cpu); its measured quality and training time
    are in benchmarks/RESULTS.md ("Demo SAE")."""
    defaults = dict(
        architecture="topk",
        hook="encoder.blocks.2",
        model_name="tiny.en",
        expansion_factor=16,
        k=64,
        lr=1e-3,
        warmup_steps=10,
        steps=800,
        batch_size=2048,
        dead_after_frames=100_000,
        eval_every=0,
        eval_batches=4,
        log_every=5,
        checkpoint_every=400,
    )
    return TrainConfig(**{**defaults, **overrides})
