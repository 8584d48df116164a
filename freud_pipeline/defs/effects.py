"""Feature effects: each SAE feature's effect on the transcript when it alone is ablated (`features.effects`).

`sae_feature_effects` (on request: it runs Whisper's encoder suffix and decoder once per feature and top clip,
minutes on CPU for the default 256 features, so `make demo`'s job leaves it out) measures the features of an
indexed SAE set (`set_id`, default the newest SAE set; the `features` listed, else the `max_features` most
frequently firing, or every feature that fires with `all_features`) on their top clips, and stores ΔCE with its
interval, ΔWER for the `wer_features` of largest ΔCE, and the set's chance level (random directions of the same
norm) in LanceDB (`features.effect_store`), where `freud effects`, the search page and the edit page read them.
"""

import dagster as dg

from freud_pipeline.defs.resources import FreudStorage


class FeatureEffectsConfig(dg.Config):
    set_id: str = ""  # empty: the newest SAE set of the index
    features: list[int] = []  # these features; empty: the most frequently firing ones
    max_features: int = 256
    all_features: bool = False  # every feature that fires (overrides max_features)
    clips_per_feature: int = 4
    wer_features: int = 8  # greedy-decoded for ΔWER: the features of largest ΔCE
    chance_features: int = 32  # features ablated along a random direction too (the set's chance level)
    batch_size: int = 16  # ablations of one clip per encoder/decoder batch
    device: str = "auto"


def _signed(value, digits: int = 4) -> str:
    return "-" if value is None or value != value else f"{value:+.{digits}f}"


def newest_sae_set(uri: str) -> str | None:
    from freud_pipeline.features.matches import sae_sets

    rows = sae_sets(uri)
    return max(rows, key=lambda r: str(r.get("created_at") or ""))["set_id"] if rows else None


@dg.asset(group_name="features", kinds={"pytorch", "lancedb"}, pool="model", deps=["sae_feature_index"],
          description="Each SAE feature's effect on the transcript when it alone is ablated (error term kept, so the "
                      "baseline is the original model): ΔCE on its top clips with an interval, ΔWER for the "
                      "strongest, and ablations along random directions as the chance level. On request.")
def sae_feature_effects(context: dg.AssetExecutionContext, config: FeatureEffectsConfig,
                        storage: FreudStorage) -> dict:
    from freud_pipeline.features.effects import compute_feature_effects

    set_id = config.set_id or newest_sae_set(storage.index_uri)
    if set_id is None:
        raise dg.Failure("no SAE feature set in the index yet: materialise sae_feature_index first")
    last = {}

    def progress(stage: str, done: int, total: int) -> None:
        if done == total or done - last.get(stage, 0) >= max(1, total // 10):
            last[stage] = done
            context.log.info(f"{set_id}: {stage} {done}/{total} ablations")

    result = compute_feature_effects(
        set_id, uri=storage.index_uri, data_root=storage.root, device=config.device, features=config.features or None,
        max_features=None if config.all_features else config.max_features, clips_per_feature=config.clips_per_feature,
        wer_features=config.wer_features, chance_features=config.chance_features, batch_size=config.batch_size,
        progress=progress)
    rows = result["features"]
    strongest = sorted(rows, key=lambda r: -r["delta_ce"])[:10]
    chance = result["chance"]
    per_1000 = 1000 * result["seconds"] / max(1, len(rows))
    context.add_output_metadata({
        "set_id": set_id, "computation_id": result["computation_id"], "n_features": len(rows),
        "n_clips": result["n_clips"], "n_ablations": result["n_ablations"], "seconds": result["seconds"],
        "seconds_per_1000_features": per_1000, "chance_delta_ce": chance["delta_ce"],
        "chance_abs_p95": chance["abs_p95"], "share_above_chance": result["share_above_chance"],
        "device": result["device"], "baseline": result["baseline"],
        "strongest": dg.MetadataValue.md("\n".join(
            ["| feature | ΔCE (nats/token) | 95% CI | clips | ΔWER |", "|---|---|---|---|---|"]
            + [f"| {r['feature']} | {_signed(r['delta_ce'])} | [{_signed(r['ci_low'])}, {_signed(r['ci_high'])}] | "
               f"{r['n_clips']} | {_signed(r['delta_wer'], 3)} |"
               for r in strongest])),
    })
    return {"set_id": set_id, "index_uri": storage.index_uri, "computation_id": result["computation_id"],
            "n_features": len(rows), "seconds": result["seconds"]}


EFFECT_ASSETS = [sae_feature_effects]
