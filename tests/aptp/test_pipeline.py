"""`RoutedPipeline.load` reads bundles and teacher folders alike."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from aptp.formats.bundle import BundleError
from aptp.formats.teacher import load_teacher
from aptp.pipeline import RoutedPipeline
from pruning.space import ArchitectureSpace
from tests.helpers import ENCODER_MAX_LENGTH, save_tiny_teacher


def test_a_teacher_folder_is_a_one_code_pipeline(teacher_folder, teacher):
    unet, spec, space = teacher
    pipeline = RoutedPipeline.load(teacher_folder)
    assert pipeline.source == "teacher" and pipeline.num_codes == 1
    assert pipeline.codes[0].macs == pipeline.teacher_macs == space.total_macs(spec.resolution)
    assert pipeline.codes[0].params == sum(p.numel() for p in unet.parameters())
    routed = pipeline.route(pipeline.encode(["a red circle", "the digit 7"]))
    assert routed.codes == [0, 0] and routed.scores == [1.0, 1.0]
    encoded = pipeline.encode(["a red circle"])
    images = pipeline.generate(0, encoded, seeds=[1], steps=2, guidance_scales=[3.0])
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8


ADAPTER_SHAPES = pytest.mark.parametrize(
    "summary_tokens, map_channels", [(0, 0), (3, 0), (5, 4)], ids=["plain", "summary", "prompt-map"]
)


@ADAPTER_SHAPES
def test_a_teacher_with_a_text_adapter_conditions_its_unet_through_it(
    tmp_path, prompt_encoder, summary_tokens, map_channels
):
    from aptp.formats.teacher import load_text_adapter

    folder = save_tiny_teacher(
        tmp_path / "teacher", adapter_width=16, summary_tokens=summary_tokens, map_channels=map_channels
    )
    adapter = load_text_adapter(folder)
    pipeline = RoutedPipeline.load(folder)
    prompts = ["a red circle top left and a blue square"]
    encoded, plain = pipeline.encode(prompts), prompt_encoder.encode(prompts)
    assert encoded.states.shape[1:] == (ENCODER_MAX_LENGTH + summary_tokens, 16)
    with torch.no_grad():
        expected = adapter(plain)
    torch.testing.assert_close(encoded.states, expected.states)
    torch.testing.assert_close(encoded.mask, expected.mask)
    if map_channels:
        assert encoded.prompt_map.shape == (1, map_channels, 2, 2)
        torch.testing.assert_close(encoded.prompt_map, expected.prompt_map)
    else:
        assert encoded.prompt_map is None
    torch.testing.assert_close(encoded.pooled, plain.pooled)  # the router's input is the encoder's own
    assert pipeline.adapter_macs_per_prompt == adapter.macs(ENCODER_MAX_LENGTH) > 0
    # The U-Net's cross-attention reads the summary tokens too, and its MACs count them.
    unet, spec = load_teacher(folder)
    longer = ArchitectureSpace.from_unet(unet, text_len=ENCODER_MAX_LENGTH + summary_tokens)
    assert pipeline.teacher_macs == longer.total_macs(spec.resolution)
    images = pipeline.generate(0, encoded, seeds=[1], steps=2, guidance_scales=[3.0])
    assert images.shape == (1, 3, 32, 32)


def test_the_prompt_map_conditions_the_image_and_is_required(tmp_path):
    folder = save_tiny_teacher(tmp_path / "teacher", adapter_width=16, summary_tokens=5, map_channels=4)
    pipeline = RoutedPipeline.load(folder)
    encoded = pipeline.encode(["a red circle top left"])

    def generate(prompt_map):
        # The empty prompt (the unconditional branch) goes without a map too when the prompt does.
        negative = replace(
            pipeline.empty_prompt, prompt_map=None if prompt_map is None else pipeline.empty_prompt.prompt_map
        )
        return pipeline.generate(0, replace(encoded, prompt_map=prompt_map), [1], 2, [3.0], negative=negative)

    assert not torch.equal(generate(encoded.prompt_map), generate(encoded.prompt_map + 1.0))
    with pytest.raises(ValueError, match="takes a 4-channel prompt map for 2 images, got none"):
        generate(None)


@ADAPTER_SHAPES
def test_a_bundle_conditions_every_code_through_the_teachers_adapter(tmp_path, summary_tokens, map_channels):
    from training.export import random_bundle

    folder = save_tiny_teacher(
        tmp_path / "teacher", adapter_width=16, summary_tokens=summary_tokens, map_channels=map_channels
    )
    bundle = random_bundle(folder, tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    teacher, routed = RoutedPipeline.load(folder), RoutedPipeline.load(bundle)
    prompts = ["a red circle top left and a blue square", "the letter K"]
    torch.testing.assert_close(routed.encode(prompts).states, teacher.encode(prompts).states)
    assert routed.adapter_macs_per_prompt == teacher.adapter_macs_per_prompt > 0
    # MACs are counted over the tokens the U-Nets read, summary tokens included, in the bundle as in the teacher.
    assert routed.teacher_macs == teacher.teacher_macs == routed.codes[0].macs
    encoded = routed.encode(prompts)
    for code in range(routed.num_codes):  # every code's expert reads the adapted states (and the prompt map)
        images = routed.generate(code, encoded, [0, 1], 2, [3.0] * 2)
        assert images.shape == (2, 3, 32, 32)
    # A prompt's image does not depend on the prompts routed beside it.
    together = routed.run(prompts, seeds=[3, 4], steps=2).images
    torch.testing.assert_close(routed.run(prompts[1:], seeds=[4], steps=2).images, together[1:], atol=1, rtol=0)


def test_a_replaced_adapter_in_a_bundle_is_refused_by_name(tmp_path):
    from aptp.conditioning.adapter import TextAdapter
    from training.export import random_bundle

    folder = save_tiny_teacher(tmp_path / "teacher", adapter_width=16)
    bundle = random_bundle(folder, tmp_path / "bundle", num_codes=2)
    weights = bundle / "text_adapter" / "model.safetensors"
    other = TextAdapter.load(bundle / "text_adapter")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save(tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(BundleError, match="checksum") as error:
        RoutedPipeline.load(bundle)
    assert str(weights) in str(error.value)


def test_a_bundle_pipeline_routes_with_its_router(tmp_path, teacher_folder):
    from training.export import random_bundle

    bundle = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=3, seed=1)
    pipeline = RoutedPipeline.load(bundle)
    assert pipeline.source == "bundle" and pipeline.num_codes == 3
    space = ArchitectureSpace.from_unet(pipeline.experts[0], text_len=ENCODER_MAX_LENGTH)
    assert pipeline.teacher_macs == pipeline.router.space.total_macs(pipeline.resolution)
    assert space.total_macs(pipeline.resolution) == pipeline.codes[0].macs  # code 0 keeps everything
    routed = pipeline.route(pipeline.encode(["a red circle", "two blue squares"]))
    expected = pipeline.router.route(["a red circle", "two blue squares"])
    assert routed.codes == expected.codes.tolist()


def test_a_bundle_loaded_to_route_only_routes_and_costs_as_the_whole_one_and_refuses_to_generate(
    tmp_path, teacher_folder
):
    """What a Ray Serve ingress loads: the encoder, router and code costs, none of the codes' U-Nets."""
    from training.export import random_bundle

    bundle = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=3, keeps=[1.0, 0.4, 0.7], seed=1)
    whole, routing = RoutedPipeline.load(bundle), RoutedPipeline.load(bundle, load_experts=False)
    assert routing.experts == [] and routing.codes == whole.codes and routing.teacher_macs == whole.teacher_macs
    assert routing.decoder_macs_per_image == whole.decoder_macs_per_image
    prompts = ["a red circle", "two blue squares", "the letter K in green"]
    assert routing.route(routing.encode(prompts)).rankings == whole.route(whole.encode(prompts)).rankings
    assert routing.device == whole.device
    with pytest.raises(RuntimeError, match="route only"):
        routing.generate(0, routing.encode(["a red circle"]), [0], 2, [1.0])


def test_a_folder_that_is_neither_names_itself(tmp_path):
    with pytest.raises(BundleError, match="manifest.json"):
        RoutedPipeline.load(tmp_path)


@pytest.fixture(scope="module")
def three_codes(tmp_path_factory, teacher_folder) -> RoutedPipeline:
    from training.export import random_bundle

    bundle = random_bundle(teacher_folder, tmp_path_factory.mktemp("budgets"), num_codes=3, keeps=[1.0, 0.4, 0.7])
    return RoutedPipeline.load(bundle)


BUDGET_PROMPTS = ["a red circle", "two blue squares at the top", "the letter K in green"]


def test_routing_ranks_every_code_with_the_routers_choice_first(three_codes):
    routed = three_codes.route(three_codes.encode(BUDGET_PROMPTS))
    for code, ranking, scores in zip(routed.codes, routed.rankings, routed.all_scores, strict=True):
        assert ranking[0] == code and sorted(ranking) == [0, 1, 2]
        assert len(scores) == 3
    assert routed.scores == [row[c] for row, c in zip(routed.all_scores, routed.codes, strict=True)]


def test_a_macs_cap_picks_the_routers_most_preferred_code_within_it(three_codes):
    from aptp.pipeline import ComputeBudget

    encoded = three_codes.encode(BUDGET_PROMPTS)
    free = three_codes.route(encoded)
    ratios = [info.macs / three_codes.teacher_macs for info in three_codes.codes]
    for cap in sorted(ratios):
        capped = three_codes.route(encoded, ComputeBudget(max_macs_ratio=cap))
        for code, ranking in zip(capped.codes, free.rankings, strict=True):
            within = [c for c in ranking if ratios[c] <= cap]
            assert code == within[0]
    assert three_codes.route(encoded, ComputeBudget(max_macs_ratio=1.0)).codes == free.codes


def test_quality_tiers_name_the_cheapest_the_routers_and_the_costliest_code(three_codes):
    from aptp.pipeline import ComputeBudget

    encoded = three_codes.encode(BUDGET_PROMPTS)
    macs = [info.macs for info in three_codes.codes]
    fast = three_codes.route(encoded, ComputeBudget(quality="fast")).codes
    best = three_codes.route(encoded, ComputeBudget(quality="best")).codes
    assert fast == [macs.index(min(macs))] * 3 and best == [macs.index(max(macs))] * 3
    assert three_codes.route(encoded, ComputeBudget(quality="balanced")).codes == three_codes.route(encoded).codes


def test_a_budget_no_code_meets_is_refused_naming_the_field(three_codes):
    from aptp.pipeline import BudgetError, ComputeBudget

    cheapest = min(info.macs for info in three_codes.codes) / three_codes.teacher_macs
    with pytest.raises(BudgetError, match="max_macs_ratio: no code costs at most") as error:
        three_codes("a red circle", num_inference_steps=1, max_macs_ratio=cheapest / 2)
    assert error.value.field == "max_macs_ratio" and f"{cheapest:.3f}" in str(error.value)
    middle = sorted(info.macs for info in three_codes.codes)[1] / three_codes.teacher_macs
    encoded = three_codes.encode(BUDGET_PROMPTS)
    best_within = three_codes.route(encoded, ComputeBudget(max_macs_ratio=middle, quality="best")).codes
    assert {three_codes.codes[c].macs / three_codes.teacher_macs for c in best_within} == {middle}
    with pytest.raises(BudgetError, match="quality: must be one of fast, balanced, best"):
        ComputeBudget(quality="cheap")


def test_a_capped_call_generates_with_the_capped_code(three_codes):
    cheapest = min(three_codes.codes, key=lambda info: info.macs)
    out = three_codes("a red circle", num_inference_steps=1, seed=3, quality="fast", output_type="pt")
    assert out.codes == [cheapest.code] and out.macs_per_call == [cheapest.macs]


def test_cheaper_codes_come_in_the_routers_order(three_codes):
    macs = [info.macs for info in three_codes.codes]
    costliest = macs.index(max(macs))
    ranking = three_codes.route(three_codes.encode(["a red circle"])).rankings[0]
    cheaper = three_codes.cheaper(ranking, costliest)
    assert cheaper == [c for c in ranking if macs[c] < macs[costliest]] and len(cheaper) == 2
    assert three_codes.cheaper(ranking, macs.index(min(macs))) == []


@pytest.mark.slow
def test_compiled_experts_make_the_eager_images_without_compiling_again_for_new_batch_sizes(tmp_path, teacher_folder):
    """`Settings.compile_mode`: once the engine's warm-up has run every expert (one guided image, one unguided), the
    batch sizes a server forms run the compiled graphs without compiling again, and every image agrees with eager
    execution (so a seed's image still does not depend on its batch)."""
    import torch._dynamo

    from server.engine import Engine
    from server.scheduler import SchedulerConfig
    from training.export import random_bundle

    bundle = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    eager = RoutedPipeline.load(bundle).to_memory_format(torch.channels_last)
    compiled = RoutedPipeline.load(bundle).to_memory_format(torch.channels_last).compile_experts()
    torch._dynamo.reset()
    Engine(compiled, SchedulerConfig(num_codes=2)).warm_up()
    prompts = eager.encode(["a red circle", "a blue square in the top left corner", "the letter K"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for code in range(2):
            args = {"seeds": [1, 2, 3], "steps": 2, "guidance_scales": [4.0] * 3, "output": "model"}
            batched = compiled.generate(code, prompts, **args)
            torch.testing.assert_close(batched, eager.generate(code, prompts, **args), atol=1e-4, rtol=1e-4)
            pair_args = args | {"seeds": [1, 2], "guidance_scales": [4.0] * 2}
            pair = compiled.generate(code, prompts.select([0, 1]), **pair_args)
            torch.testing.assert_close(pair, batched[:2], atol=1e-5, rtol=1e-5)


def test_channels_last_experts_make_the_same_images_alone_or_batched(tmp_path, teacher_folder):
    """The serving layout (`Settings.channels_last`) changes how convolutions run, not what they compute: every
    code's images agree with the default layout's to float rounding, and a seed's image does not depend on its
    batch."""
    from training.export import random_bundle

    bundle = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    default, nhwc = RoutedPipeline.load(bundle), RoutedPipeline.load(bundle).to_memory_format(torch.channels_last)
    conv = next(m for m in nhwc.experts[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    prompts = default.encode(["a red circle", "a blue square", "the letter K"])
    for code in range(2):
        args = {"seeds": [1, 2, 3], "steps": 2, "guidance_scales": [4.0] * 3, "output": "model"}
        batched = nhwc.generate(code, prompts, **args)
        torch.testing.assert_close(batched, default.generate(code, prompts, **args), atol=1e-4, rtol=1e-4)
        alone = nhwc.generate(code, prompts.select([1]), seeds=[2], steps=2, guidance_scales=[4.0], output="model")
        torch.testing.assert_close(alone[0], batched[1], atol=1e-5, rtol=1e-5)
