"""SAE training speed: our TopK step against EleutherAI's sparsify SparseCoder, our JumpReLU and Matryoshka
BatchTopK steps beside them, and the demo SAE end to end.

1. Frames per second of one training step at the same shape (d 384, 16x = 6144 latents, k 32, batch 4096 frames,
   fp32, Adam), all in this process, with the same torch threads and the same real activation batches,
   measured side by side: repeats interleave the implementations (alternating the order), and each reports the
   median step time. Two regimes: no dead latents (AuxK idle, early training) and 25 % dead latents (AuxK on).
   Our steps are `freud_pipeline.sae.train.training_step` (what train_sae runs) for TopK, JumpReLU (L0 target 32,
   thresholds initialised from the first batch) and Matryoshka BatchTopK (k 32 on average, prefixes 1/16, 1/4, 1);
   sparsify's is the body of its Trainer's step for one SAE (unit-norm decoder, forward with the dead mask,
   fvu + auxk/32, backward, removal of the decoder-parallel gradient, Adam, dead-latent bookkeeping). The ratio
   reported is sparsify's TopK against ours; JumpReLU and Matryoshka report their frames/s and their speed relative
   to our TopK.
2. Peak memory of each step: a fresh subprocess per implementation runs a few steps; the increase of its peak RSS
   (VmHWM, reset just before the first step) over its RSS before that step is the step's memory.
3. The demo SAE (configs/train/demo_topk.yaml): the pipeline's SAE run (`run_sae`: train, splice-evaluate,
   quality gate; not registered) on real tiny.en encoder.blocks.2 activations of the default corpus
   (data/activations/tiny.en/default_corpus/{train,dev}, collected into a temporary directory if absent): its
   training wall time, final dev FVU, and CE recovered when spliced into 8 held-out clips.

sparsify is not a dependency: install it apart from the venv (its dependencies are all absent from our pins, so
nothing of ours changes), and point --sparsify-path at that directory (default .venv/extras/sparsify):
  .venv/bin/pip install --no-deps --target .venv/extras/sparsify eai-sparsify==1.3.3 accelerate==1.15.0 \
      datasets==5.2.0 einops==0.8.2 hf-xet==1.8.0 httpcore2==2.16.2 httpx2==2.16.2 huggingface_hub==2.4.0 \
      natsort==8.4.0 schedulefree==1.4.1 shellingham==1.5.4 simple-parsing==0.1.9 tokenizers==0.23.3 \
      transformers==5.24.0 truststore==0.10.5 typer==0.29.2 xxhash==4.1.0
(the list `pip install --dry-run eai-sparsify==1.3.3` reports as missing). SPARSIFY_DISABLE_TRITON=1 is set.

Run: .venv/bin/python benchmarks/train.py [--threads 2] [--repeats 5] [--json out.json] [--skip-demo]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

D_IN, EXPANSION, K, BATCH = 384, 16, 32, 4096
HOOK = "encoder.blocks.2"
DEAD_AFTER = 1_000_000
ACTIVATIONS = REPO / "data" / "activations" / "tiny.en" / "default_corpus"


# --- data ----------------------------------------------------------------------------------------------------------
def activation_dirs(scratch: Path) -> dict[str, Path]:
    """{train, dev} shard directories with real tiny.en activations (collected into `scratch` if missing)."""
    from freud_pipeline.activations.writer import MANIFEST

    dirs = {}
    for split in ("train", "dev"):
        directory = ACTIVATIONS / split
        manifest = directory / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
            dirs[split] = directory
        else:
            dirs[split] = collect_split(split, scratch / split)
    return dirs


def collect_split(split: str, out: Path) -> Path:
    from freud_pipeline import settings
    from freud_pipeline.activations.collect import collect_activations
    from freud_pipeline.audio.datasets import load_manifest

    manifest_path = settings.data_dir() / "datasets" / "default_corpus" / "manifest.parquet"
    if not manifest_path.is_file():
        raise SystemExit(f"no activations under {ACTIVATIONS} and no default corpus at {manifest_path}: "
                         f"run `make demo` (or freud collect --config configs/features/default_block_2_{split}.yaml)")
    rows = load_manifest(manifest_path)
    rows = rows[rows["split"] == split]
    print(f"collecting {split} activations of {len(rows)} clips into {out} ...", flush=True)
    collect_activations(rows, out, model="tiny.en", hooks=[HOOK], device="cpu", data_root=settings.data_dir())
    return out


def real_batches(train_dir: Path, n: int, seed: int = 0):
    """`n` batches of 4096 real frames, scaled as train_sae scales them (mean norm sqrt(d))."""
    import torch

    from freud_pipeline.activations import ActivationReader
    from freud_pipeline.sae.scaling import estimate_input_scale

    frames = ActivationReader(train_dir).random_frames(HOOK, BATCH, seed)
    batches = [torch.as_tensor(next(frames)).float() for _ in range(n)]
    scale = estimate_input_scale(batches, D_IN)
    return [b * scale for b in batches]


# --- the two steps ---------------------------------------------------------------------------------------------------
class Ours:
    name = "freud TopKSAE"
    architecture = "topk"

    def __init__(self, sample):
        import torch
        from torch.optim.lr_scheduler import LambdaLR

        from freud_pipeline.sae import TrainConfig, architecture_class
        from freud_pipeline.sae.firing import FiringTracker
        from freud_pipeline.sae.train import lr_factor, make_optimizer

        torch.manual_seed(0)
        cfg = TrainConfig(architecture=self.architecture, hook=HOOK, expansion_factor=EXPANSION, k=K, l0_target=K,
                          lr=1e-4, optimiser="adam", warmup_steps=10, dead_after_frames=DEAD_AFTER, device="cpu")
        self.cfg = cfg
        self.sae = architecture_class(self.architecture).from_cfg(
            {"d_in": D_IN, "d_sae": EXPANSION * D_IN, **cfg.model_dump()})
        self.sae.init_from_data(sample)
        self.optimizer = make_optimizer(cfg, self.sae)
        self.scheduler = LambdaLR(self.optimizer, lr_factor(cfg))
        self.tracker = FiringTracker(self.sae.n_latents, DEAD_AFTER)
        self.forced_dead = None

    def force_dead(self, mask) -> None:
        self.forced_dead = mask

    def step(self, x) -> float:
        from freud_pipeline.sae.train import training_step

        if self.forced_dead is not None:
            self.tracker.frames_since_fired[self.forced_dead] = 10 * DEAD_AFTER
        out, _, _ = training_step(self.sae, x, self.optimizer, self.scheduler, self.tracker, self.cfg.grad_clip)
        return float(out.loss_parts["fvu"].detach())


class OursJumpReLU(Ours):
    name = "freud JumpReLUSAE"
    architecture = "jumprelu"


class OursMatryoshka(Ours):
    name = "freud MatryoshkaBatchTopKSAE"
    architecture = "matryoshka_batchtopk"


class Sparsify:
    name = "sparsify SparseCoder"

    def __init__(self, sample):
        import torch
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        self.sae = SparseCoder(D_IN, SparseCoderConfig(expansion_factor=EXPANSION, k=K), device="cpu")
        self.sae.b_dec.data = sample.mean(0)  # as its Trainer initialises b_dec from the first batch
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=1e-4)  # what its Trainer builds on CPU
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / 10))
        self.since_fired = torch.zeros(self.sae.num_latents, dtype=torch.long)
        self.did_fire = torch.zeros(self.sae.num_latents, dtype=torch.bool)
        self.forced_dead = None

    def force_dead(self, mask) -> None:
        self.forced_dead = mask

    def step(self, x) -> float:
        if self.forced_dead is not None:
            self.since_fired[self.forced_dead] = 10 * DEAD_AFTER
        sae = self.sae
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x=x, y=x, dead_mask=self.since_fired > DEAD_AFTER)
        self.did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.since_fired += x.shape[0]
        self.since_fired[self.did_fire] = 0
        self.did_fire.zero_()
        return float(out.fvu.detach())


def import_sparsify(path: Path) -> None:
    if str(path) not in sys.path:
        sys.path.append(str(path))  # after the venv: never shadows our torch/numpy pins
    try:
        importlib.import_module("sparsify")
    except ImportError as exc:
        raise SystemExit(f"sparsify is not importable from {path} ({exc}); install it there as the module "
                         f"docstring says (python benchmarks/train.py --help)") from None


# --- 1. side-by-side throughput ----------------------------------------------------------------------------------
def throughput(batches, repeats: int, steps: int, warmup: int, dead_fraction: float,
               classes=(Ours, Sparsify, OursJumpReLU, OursMatryoshka)) -> dict:
    import torch

    impls = [cls(batches[0]) for cls in classes]
    n_latents = EXPANSION * D_IN
    if dead_fraction > 0:
        mask = torch.zeros(n_latents, dtype=torch.bool)
        mask[torch.randperm(n_latents, generator=torch.Generator().manual_seed(1))[: int(dead_fraction * n_latents)]] = True
        for impl in impls:
            impl.force_dead(mask)
    for impl in impls:
        for i in range(warmup):
            impl.step(batches[i % len(batches)])
    times = {impl.name: [] for impl in impls}
    ratios, relative = [], {impl.name: [] for impl in impls if impl.name not in (Ours.name, Sparsify.name)}
    for repeat in range(repeats):
        order = impls if repeat % 2 == 0 else impls[::-1]
        medians = {}
        for impl in order:
            step_times = []
            for i in range(steps):
                x = batches[(repeat * steps + i) % len(batches)]
                started = time.perf_counter()
                impl.step(x)
                step_times.append(time.perf_counter() - started)
            times[impl.name] += step_times
            medians[impl.name] = statistics.median(step_times)
        if Sparsify.name in medians:
            ratios.append(medians[Sparsify.name] / medians[Ours.name])
        for name in relative:
            relative[name].append(medians[Ours.name] / medians[name])
        print(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{name} {BATCH / t:,.0f} frames/s" for name, t in medians.items())
              + (f"  (ours {ratios[-1]:.2f}x)" if ratios else ""), flush=True)
    result = {name: {"median_step_s": statistics.median(t), "frames_per_s": BATCH / statistics.median(t),
                     "steps_per_s": 1 / statistics.median(t), "min_step_s": min(t), "n_steps": len(t)}
              for name, t in times.items()}
    for name, values in relative.items():  # > 1: faster than our TopK step
        result[name]["speed_relative_to_our_topk"] = statistics.median(values)
    if ratios:
        result["speedup_ours_over_sparsify"] = statistics.median(ratios)
        result["speedup_per_repeat"] = ratios
    result["dead_fraction"] = dead_fraction
    return result


# --- 2. peak memory in subprocesses --------------------------------------------------------------------------------
def _memory_child(which: str, batches_file: str, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if which == "sparsify":
        import_sparsify(Path(os.environ["FREUD_BENCH_SPARSIFY"]))
    batches = torch.load(batches_file)  # 2 x 6 MB: reading the shards here would set the peak before any step
    impl = (Ours if which == "ours" else Sparsify)(batches[0])
    # /proc's VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report the parent's peak.
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_kb("VmRSS")
    for i in range(steps):
        impl.step(batches[i % 2])
    peak = _proc_status_kb("VmHWM")
    print(json.dumps({"peak_rss_mb": peak / 1024, "before_steps_mb": before / 1024,
                      "step_peak_mb": (peak - before) / 1024}))


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory(batches, scratch: Path, sparsify_path: Path, threads: int, steps: int = 3) -> dict:
    import torch

    batches_file = scratch / "batches.pt"
    torch.save([b.clone() for b in batches[:2]], batches_file)
    result = {}
    for which in ("ours", "sparsify"):
        env = {**os.environ, "FREUD_BENCH_SPARSIFY": str(sparsify_path)}
        out = subprocess.run([sys.executable, __file__, "--memory-child", which, "--batches-file", str(batches_file),
                              "--threads", str(threads), "--steps", str(steps)],
                             capture_output=True, text=True, env=env, check=True)
        result[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {which}: peak RSS {result[which]['peak_rss_mb']:.0f} MB, of which the steps "
              f"{result[which]['step_peak_mb']:.0f} MB", flush=True)
    return result


# --- 3. the demo SAE ---------------------------------------------------------------------------------------------
def demo_sae(dirs: dict[str, Path], scratch: Path, splice_clips: int) -> dict:
    """The demo SAE run as the pipeline runs it (`freud_pipeline.sae.run.run_sae`), into a scratch MLflow store."""
    from freud_pipeline import settings
    from freud_pipeline.activations import ActivationReader
    from freud_pipeline.validation import load_run_config
    from freud_pipeline.sae.run import SaeRunConfig, run_sae
    from freud_pipeline.sae.tracking import TrainingRun

    run = load_run_config(REPO / "configs" / "train" / "demo_topk.yaml")
    manifest = settings.data_dir() / "datasets" / "default_corpus" / "manifest.parquet"
    cfg = SaeRunConfig(**run["config"], model_name="tiny.en", register_model=False,
                       splice_clips=splice_clips if manifest.is_file() else 0)
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    with TrainingRun(uri, "bench-warmup", "warmup", {}):  # creates the store: not part of the demo's time
        pass
    result = run_sae(cfg, ActivationReader(dirs["train"]), ActivationReader(dirs["dev"]), runs_dir=scratch / "sae",
                     tracking_uri=uri, experiment="bench-demo", data_root=settings.data_dir(),
                     corpus_manifest=manifest if manifest.is_file() else None)
    out = {"config": run["config"], "train_sae_wall_s": result.seconds["train"],
           "frames_per_s": result.frames_per_second, "steps": cfg.steps, "frames": cfg.steps * cfg.batch_size,
           **{k.removeprefix("eval/"): v for k, v in result.metrics.items() if k.startswith("eval/")}}
    print(f"  demo SAE: {out['train_sae_wall_s']:.0f} s wall for training, {result.frames_per_second:,.0f} frames/s, "
          f"dev FVU {out['fvu']:.4f}, L0 {out['l0']:.1f}, dead {100 * out['dead_fraction']:.1f} %", flush=True)
    splice = result.splice
    if splice:
        out["splice_wall_s"] = result.seconds["splice"]
        out.update({k: v for k, v in splice.items() if isinstance(v, (int, float))})
        print(f"  spliced into {splice['n_clips']} held-out clips: CE {splice['ce_original']:.3f} -> "
              f"{splice['ce_spliced']:.3f} (zero {splice['ce_zero']:.3f}), CE recovered {splice['ce_recovered']:.3f}, "
              f"WER {splice['wer_original']:.3f} -> {splice['wer_spliced']:.3f}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per regime")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dead", type=float, nargs="*", default=[0.0, 0.25], help="dead-latent fractions")
    parser.add_argument("--sparsify-path", type=Path, default=REPO / ".venv" / "extras" / "sparsify")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--splice-clips", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--memory-child", choices=["ours", "sparsify"], help=argparse.SUPPRESS)
    parser.add_argument("--batches-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child, args.batches_file, args.steps, args.threads)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    import_sparsify(args.sparsify_path)
    import sparsify

    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_avg_at_start": os.getloadavg(), "torch": torch.__version__,
                          "sparsify": sparsify.__version__, "threads": args.threads},
              "shape": {"d_in": D_IN, "n_latents": EXPANSION * D_IN, "k": K, "batch": BATCH, "dtype": "float32",
                        "optimiser": "Adam"}}
    with tempfile.TemporaryDirectory(prefix="freud-bench-train-") as tmp:
        scratch = Path(tmp)
        dirs = activation_dirs(scratch)
        batches = real_batches(dirs["train"], 8)
        report["throughput"] = {}
        for dead in args.dead:
            print(f"step throughput, {torch.get_num_threads()} thread(s), {100 * dead:.0f} % dead latents:", flush=True)
            report["throughput"][f"dead_{dead:g}"] = throughput(batches, args.repeats, args.steps, args.warmup, dead)
        if not args.skip_memory:
            print("peak memory (fresh subprocess each, 3 steps, no dead latents):", flush=True)
            report["memory"] = peak_memory(batches, scratch, args.sparsify_path, args.threads)
        if not args.skip_demo:
            print("demo SAE (configs/train/demo_topk.yaml):", flush=True)
            report["demo"] = demo_sae(dirs, scratch, args.splice_clips)
    report["machine"]["load_avg_at_end"] = os.getloadavg()

    print("\nsummary")
    for regime, result in report["throughput"].items():
        ours, theirs = result[Ours.name], result[Sparsify.name]
        print(f"  {regime:9s} ours {ours['frames_per_s']:8,.0f} frames/s   sparsify {theirs['frames_per_s']:8,.0f} "
              f"frames/s   ours/sparsify {result['speedup_ours_over_sparsify']:.2f}x (median of per-repeat ratios)")
        for cls in (OursJumpReLU, OursMatryoshka):
            mine = result[cls.name]
            print(f"  {'':9s} {cls.name} {mine['frames_per_s']:8,.0f} frames/s ({mine['steps_per_s']:.2f} steps/s), "
                  f"{mine['speed_relative_to_our_topk']:.2f}x our TopK's speed")
    if "memory" in report:
        print("  step peak memory: " + ", ".join(f"{k} {v['step_peak_mb']:.0f} MB" for k, v in report["memory"].items()))
    if "demo" in report:
        demo = report["demo"]
        print(f"  demo SAE: {demo['train_sae_wall_s']:.0f} s, dev FVU {demo['fvu']:.4f}"
              + (f", CE recovered {demo['ce_recovered']:.3f}" if "ce_recovered" in demo else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
