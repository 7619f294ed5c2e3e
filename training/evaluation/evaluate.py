"""`aptp eval`: prompt alignment, domain FID and CMMD of a text-to-image model on the shapes domain.

Prompts come from the `test` split (held-out prompts: same distribution as training, never trained on), the
`heldout` split (attribute combinations never seen in training), with a fixed seed, and the paraphrase set
(`training.evaluation.paraphrases`: the domain's scenes in phrasings the caption generator never writes). Every
figure is given next to its real-vs-real floor: the same metric between two disjoint sets of real images. For a
routed bundle it also reports where the prompts went: the share of prompts per code and the mean MACs per U-Net
call (as a fraction of the teacher's), overall and per tier. A teacher folder is evaluated as a one-code bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aptp.formats.report import Provenance, write_report
from aptp.pipeline import RoutedPipeline
from training.data.labels import collate
from training.data.shapes import Sample, ShapesDomain

from .evaluator import DomainEvaluator, alignment, read_images
from .metrics import domain_fid, evaluator_features, mean_by_tier, median_bandwidth, mmd_rbf
from .paraphrases import PARAPHRASE_COUNT, load_paraphrases
from .reports import EvalReport, SplitResult, markdown_table, routing_summary


def evaluation_samples(split: str, num_prompts: int, seed: int) -> list[Sample]:
    """The prompts (with their scenes) that `aptp eval` scores on `split`. The domain's splits (`test`,
    `heldout`) are captioned in the caption generator's first templates (`training.data.template_captions`), the
    fixed test every report since the first was made on; phrasing beyond them is what the paraphrase set
    (`paraphrases`, its first `num_prompts`) measures."""
    if split == "paraphrases":
        return load_paraphrases(image_seed=seed)[:num_prompts]
    return _domain(split, seed).batch(0, num_prompts)


def _domain(split: str, seed: int) -> ShapesDomain:
    return ShapesDomain(seed=seed, split=split, phrasing="templates")


def evaluate_split(
    pipeline: RoutedPipeline,
    evaluator: DomainEvaluator,
    split: str,
    num_prompts: int,
    seed: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """`evaluate_samples` on `num_prompts` prompts of a domain split (`test`, `heldout`), or of the paraphrase
    set (`paraphrases`: its first `num_prompts`)."""
    samples = evaluation_samples(split, num_prompts, seed)
    if split == "paraphrases":
        floor_samples = load_paraphrases(image_seed=seed + 1)[:num_prompts]  # the same scenes, drawn again
    else:
        floor_samples = _domain(split, seed).batch(num_prompts, num_prompts)  # disjoint real set
    return evaluate_samples(pipeline, evaluator, split, samples, floor_samples, seed, steps, guidance_scale)


def evaluate_samples(
    pipeline: RoutedPipeline,
    evaluator: DomainEvaluator,
    split: str,
    samples: Sequence[Sample],
    floor_samples: Sequence[Sample],
    seed: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Alignment (overall, per tier), domain FID, CMMD and routing (load per code, MACs per tier) of `pipeline`
    on the prompts of `samples`; FID and CMMD floors are measured between their real images and `floor_samples`'."""
    num_prompts = len(samples)
    prompts = [s.caption for s in samples]
    seeds = [seed * 100_003 + i for i in range(num_prompts)]
    made = pipeline.run(prompts, seeds, steps=steps, guidance_scale=guidance_scale)
    generated = made.images
    real, _ = collate(samples)
    real_other, _ = collate(floor_samples)
    tiers = np.array([s.scene.tier for s in samples])

    def alignment_per_prompt(images: torch.Tensor) -> np.ndarray:
        read = read_images(evaluator, images)
        return np.array([alignment(s.scene, r) for s, r in zip(samples, read, strict=True)])

    aligned = alignment_per_prompt(generated)

    routing = routing_summary(made.codes, [c.macs for c in pipeline.codes], pipeline.teacher_macs, tiers)
    real_features, other_features = evaluator_features(evaluator, real), evaluator_features(evaluator, real_other)
    sigma = median_bandwidth(real_features)
    return {
        "split": split,
        "prompts": num_prompts,
        "alignment": mean_by_tier(aligned, tiers),
        "alignment_real": mean_by_tier(alignment_per_prompt(real), tiers),
        # Same prompts and seeds in every report of this seed and size, so models can be compared prompt by prompt.
        "alignment_per_prompt": [round(float(v), 4) for v in aligned],
        "domain_fid": domain_fid(evaluator, real, generated),
        "domain_fid_floor": domain_fid(evaluator, real, real_other),
        "cmmd": mmd_rbf(real_features, evaluator_features(evaluator, generated), sigma),
        "cmmd_floor": mmd_rbf(real_features, other_features, sigma),
        "tier_counts": {f"tier{t}": sum(s.scene.tier == t for s in samples) for t in range(1, 5)},
        "routing": routing,
        "_generated": generated,
        "_codes": made.codes,
        "_samples": samples,
    }


def tier_grid(results: dict[str, Any], per_tier: int = 8, scale: int = 4) -> tuple[Image.Image, list[str]]:
    """A PNG grid: one row per tier, `per_tier` generated images each; returns the image and its captions."""
    rows, captions = [], []
    for tier in range(1, 5):
        picks = [i for i, s in enumerate(results["_samples"]) if s.scene.tier == tier][:per_tier]
        if not picks:
            continue
        row = torch.cat([results["_generated"][i] for i in picks], dim=2)  # (3, H, W * n)
        pad = per_tier * row.shape[1] - row.shape[2]
        rows.append(torch.nn.functional.pad(row, (0, pad)))
        captions += [f"tier {tier}, image {k + 1}: {results['_samples'][i].caption}" for k, i in enumerate(picks)]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST), captions


def code_grid(
    images: torch.Tensor, codes: Sequence[int], prompts: Sequence[str], per_code: int = 8, scale: int = 4
) -> tuple[Image.Image, list[str]]:
    """A PNG grid: one row per code that received prompts, up to `per_code` of its images (uint8 `(N, 3, H, W)`,
    image i made for `prompts[i]` by code `codes[i]`)."""
    rows, captions = [], []
    for code in sorted(set(codes)):
        picks = [i for i, c in enumerate(codes) if c == code][:per_code]
        row = torch.cat([images[i] for i in picks], dim=2)
        rows.append(torch.nn.functional.pad(row, (0, per_code * row.shape[1] - row.shape[2])))
        captions += [f"code {code}, image {k + 1}: {prompts[i]}" for k, i in enumerate(picks)]
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST), captions


def run_eval(
    pipeline: RoutedPipeline,
    evaluator: DomainEvaluator,
    out: str | Path,
    name: str,
    num_prompts: int = 1000,
    num_heldout: int = 400,
    seed: int = 7,
    extra: dict[str, Any] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    provenance: Provenance | None = None,
    num_paraphrases: int = PARAPHRASE_COUNT,
) -> EvalReport:
    """Evaluate on the test and heldout splits and on the first `num_paraphrases` prompts of the paraphrase set
    (none with 0); writes `<name>.json`, `<name>.md` and `<name>_samples.png` (+ captions) to `out`,
    and `<name>_codes.png` (one row per code) for a multi-code bundle."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [
        evaluate_split(pipeline, evaluator, split, count, seed, steps, guidance_scale)
        for split, count in (("test", num_prompts), ("heldout", num_heldout), ("paraphrases", num_paraphrases))
        if count > 0
    ]
    grid, captions = tier_grid(results[0])
    grid.save(out / f"{name}_samples.png")
    (out / f"{name}_samples.txt").write_text("\n".join(captions) + "\n")
    if pipeline.num_codes > 1:
        first = results[0]
        grid, captions = code_grid(first["_generated"], first["_codes"], [s.caption for s in first["_samples"]])
        grid.save(out / f"{name}_codes.png")
        (out / f"{name}_codes.txt").write_text("\n".join(captions) + "\n")
    clean = [SplitResult.model_validate({k: v for k, v in r.items() if not k.startswith("_")}) for r in results]
    # Runs once per prompt, not per U-Net call, so it is reported beside the per-call MACs rather than in them.
    adapter = {"text_adapter_macs_per_prompt": pipeline.adapter_macs_per_prompt}
    report = EvalReport(name=name, seed=seed, **adapter, **(extra or {}), results=clean)
    figures = report.model_dump(mode="json", exclude={"provenance"})
    write_report(out, name, figures, markdown_table(name, clean), provenance=provenance)
    return report
