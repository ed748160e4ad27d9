"""Asset checks that guard each hand-off: every exported checkpoint loads with ``from_pretrained`` and
generates; the corpus and the evaluation checks live beside their assets."""

from collections.abc import Sequence

import dagster as dg

from assets.common import read_checkpoint
from assets.stage_runner import local_model_dir
from resources import PipelineSettings, StorageResource


def _loads_and_generates(model_dir: str, n_tokens: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # trust_remote_code stays off
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, tokenize=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]  # fmt: skip
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)
    return {
        "new_tokens": int(out.shape[1] - ids.shape[1]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def checkpoint_loads_check(asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """A blocking check: the asset's published checkpoint loads and generates a few tokens."""

    @dg.asset_check(asset=asset, name="loads_and_generates", blocking=True,
                    description="The published checkpoint loads with from_pretrained and generates.")  # fmt: skip
    def _check(
        context: dg.AssetCheckExecutionContext, settings: PipelineSettings, storage: StorageResource
    ) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(asset.key)
        if event is None or event.asset_materialization is None:
            return dg.AssetCheckResult(passed=False, metadata={"reason": "not materialized"})
        partition = event.asset_materialization.metadata["checkpoint"].value
        ref = read_checkpoint(storage.get(), str(partition))
        stats = _loads_and_generates(str(local_model_dir(settings, storage.get(), ref)))
        return dg.AssetCheckResult(
            passed=stats["new_tokens"] > 0, metadata={**stats, "checkpoint": partition}
        )

    return _check


def checkpoint_checks(assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetChecksDefinition]:
    return [checkpoint_loads_check(a) for a in assets]
