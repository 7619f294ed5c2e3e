"""`aptp train search` on a tiny teacher: the per-step log of docs/method.md's losses, warm-up then codes, a loadable
router whose code offsets balance the training prompts, exact resume after a kill, and a finished run that
re-balances instead of retraining."""

from __future__ import annotations

import json
import math

import pytest
import torch

import aptp.conditioning.conditioner as conditioner_module
import training.data.captions as captions_module
import training.search as search_module
from aptp.formats.teacher import load_teacher
from router.model import Router
from tests.helpers import ENCODER_MAX_LENGTH, save_tiny_teacher, shared_encoder_factory
from tests.router.test_model import nested_architectures
from training.config import ConfigError
from training.data.shapes import ShapesDomain
from training.search import SearchConfig, run_search

STEPS = 4
BATCH = 4
LOSS_KEYS = {"loss", "denoise", "output", "features", "resource", "contrastive", "spread_std", "spread_max"}


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, prompt_encoder):
    monkeypatch.setattr(search_module, "PromptEncoder", shared_encoder_factory(prompt_encoder))
    monkeypatch.setattr(conditioner_module, "PromptEncoder", shared_encoder_factory(prompt_encoder))


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("search") / "teacher")


def _config(teacher_folder, out, **overrides) -> SearchConfig:
    data = {
        "teacher": str(teacher_folder),
        "out": str(out),
        "steps": STEPS,
        "batch_size": BATCH,
        "num_codes": 2,
        "warmup_fraction": 0.5,
        "lr": 1e-2,
        "log_every": 1,
        "balance_prompts": 48,
        "checkpoint_minutes": 60.0,
        **overrides,
    }
    return SearchConfig.model_validate(data)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_search_logs_every_loss_and_writes_a_balanced_router(teacher_folder, tmp_path):
    folder = run_search(_config(teacher_folder, tmp_path / "run"))
    assert folder == tmp_path / "run" / "router"
    records = _records(tmp_path / "run")
    steps = [r for r in records if r["phase"] != "balance"]
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert [r["phase"] for r in steps] == ["warmup", "warmup", "codes", "codes"]
    for record in steps:
        assert record.keys() >= LOSS_KEYS
        assert all(math.isfinite(record[k]) for k in LOSS_KEYS)
        assert 0 < record["routed_prunable_ratio"] <= 1
        assert len(record["code_prunable_ratio"]) == 2 and len(record["code_usage"]) == 2
        assert sum(record["code_usage"]) == pytest.approx(1.0)
    (balance,) = [r for r in records if r["phase"] == "balance"]

    router = Router.load(folder)
    assert router.config.num_codes == 2
    assert router.code_offsets.tolist() == pytest.approx(balance["code_offsets"], abs=1e-6)
    # The logged balanced shares are what the saved router does with the same training prompts.
    domain = ShapesDomain(seed=1, split="train")
    codes = router.route([domain.sample(i).caption for i in range(48)]).codes
    shares = (torch.bincount(codes, minlength=2) / 48).tolist()
    assert shares == pytest.approx(balance["code_share_balanced"], abs=1e-6)


def test_noise_anneal_ends_the_search_on_the_noise_free_gates(teacher_folder, tmp_path):
    run_search(_config(teacher_folder, tmp_path / "run", noise_anneal=[0.5, 1.0], balance_prompts=0))
    steps = [r for r in _records(tmp_path / "run") if r["phase"] != "balance"]
    assert [r["noise_scale"] for r in steps] == [1.0, 1.0, 1.0, 0.0]


def test_constant_noise_is_the_default(teacher_folder, tmp_path):
    run_search(_config(teacher_folder, tmp_path / "run", steps=2, balance_prompts=0))
    assert [r["noise_scale"] for r in _records(tmp_path / "run")] == [1.0, 1.0]


@pytest.mark.parametrize("bad", [[0.9, 0.5], [0.5, 0.5], [-0.1, 0.5], [0.5, 1.2]])
def test_a_noise_anneal_outside_the_run_is_refused(teacher_folder, tmp_path, bad):
    with pytest.raises(ValueError, match="noise_anneal"):
        _config(teacher_folder, tmp_path / "run", noise_anneal=bad)


class Killed(Exception):
    """Stands in for SIGKILL: raised from inside the training loop."""


DIFFICULTY = {"difficulty_weight": 1.0, "budget": 0.6, "code_budgets": [0.4, 0.8]}


@pytest.mark.parametrize("settings", [{}, DIFFICULTY], ids=["plain", "difficulty"])
def test_search_resumes_exactly_after_a_kill(teacher_folder, tmp_path, monkeypatch, settings):
    straight = Router.load(run_search(_config(teacher_folder, tmp_path / "straight", **settings)))

    class DyingData(captions_module.ShapesData):
        def take(self, positions):
            if positions[0] == 3 * BATCH:
                raise Killed("killed at step 3")
            return super().take(positions)

    config = _config(teacher_folder, tmp_path / "killed", checkpoint_minutes=1e-9, **settings)
    healthy = captions_module.ShapesData
    monkeypatch.setattr(captions_module, "ShapesData", DyingData)
    with pytest.raises(Killed):
        run_search(config)
    assert not (tmp_path / "killed" / "router").exists()
    monkeypatch.setattr(captions_module, "ShapesData", healthy)
    resumed = Router.load(run_search(config))
    # Steps 0-2 ran before the kill and were not run again: the run went on from its checkpoint.
    assert [r["step"] for r in _records(tmp_path / "killed") if r["phase"] != "balance"] == list(range(STEPS))
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(resumed.code_architectures(), straight.code_architectures())


def test_a_finished_search_only_rebalances(teacher_folder, tmp_path):
    config = _config(teacher_folder, tmp_path / "run")
    first = Router.load(run_search(config))
    again = Router.load(run_search(config.model_copy(update={"balance_prompts": 24})))
    for name, tensor in first.state_dict().items():  # no further training
        assert torch.equal(again.state_dict()[name], tensor), name
    phases = [r["phase"] for r in _records(tmp_path / "run")]
    assert phases.count("balance") == 2 and phases.count("codes") == 2


def test_codes_can_be_balanced_on_the_traffic_to_serve_instead_of_the_training_prompts(teacher_folder, tmp_path):
    """Prompts phrased unlike the training captions can crowd into a few codes (and miss the budget): a finished
    search re-fits its offsets on a file of the prompts to serve (`Router.balance` splits what it is given evenly:
    tests/router), and nothing else of the router changes."""
    from training.data.shapes import ShapesDomain

    config = _config(teacher_folder, tmp_path / "run", balance_prompts=1000)
    trained = Router.load(run_search(config))
    traffic = [s.caption for s in ShapesDomain(seed=5, split="train", phrasing="templates").batch(0, 64)]
    prompt_file = tmp_path / "traffic.txt"
    prompt_file.write_text("# prompts like those the bundle will serve\n" + "\n".join(traffic) + "\n")
    balanced = Router.load(run_search(config.model_copy(update={"balance_prompts_file": prompt_file})))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(balanced.state_dict()[name], tensor), name
    trained.balance(trained.encoder.encode(traffic).pooled, epsilon=config.balance_epsilon)
    assert torch.equal(balanced.code_offsets, trained.code_offsets)
    first, second = [r for r in _records(tmp_path / "run") if r["phase"] == "balance"]
    assert (first["balance_source"], first["balance_count"]) == ("training", 1000)
    assert (second["balance_source"], second["balance_count"]) == (str(prompt_file), 64)


def test_a_missing_balance_file_stops_the_search_before_it_trains(teacher_folder, tmp_path):
    from training.data.captions import DatasetError

    config = _config(teacher_folder, tmp_path / "run", balance_prompts_file=str(tmp_path / "absent.txt"))
    with pytest.raises(DatasetError, match="absent.txt"):
        run_search(config)
    assert not (tmp_path / "run" / "log.jsonl").exists() or not _records(tmp_path / "run")


def test_balance_can_be_switched_off(teacher_folder, tmp_path):
    router = Router.load(run_search(_config(teacher_folder, tmp_path / "run", balance_prompts=0)))
    assert torch.equal(router.code_offsets, torch.zeros(2))
    assert all(r["phase"] != "balance" for r in _records(tmp_path / "run"))


def test_a_run_folder_of_other_settings_is_not_resumed(teacher_folder, tmp_path, capsys):
    from training.config import ConfigError

    config = _config(teacher_folder, tmp_path / "run", checkpoint_minutes=1e-9)
    run_search(config)
    saved = (tmp_path / "run" / "config.json").read_text()
    other = config.model_copy(update={"use_ot": False, "lr": 1e-3})
    with pytest.raises(ConfigError, match=r"lr, use_ot differ"):
        run_search(other)
    assert (tmp_path / "run" / "config.json").read_text() == saved  # the old run's record is kept
    # Runtime-only fields may change: the finished run just re-balances.
    run_search(config.model_copy(update={"threads": 1, "log_every": 2, "balance_prompts": 24}))


@pytest.mark.parametrize("summary_tokens, map_channels", [(0, 0), (3, 0), (5, 4)])
def test_search_on_a_teacher_with_a_text_adapter(tmp_path, summary_tokens, map_channels):
    """The U-Nets read the adapter's states (and its prompt map); the router reads the frozen encoder's sentence
    embedding."""
    teacher_folder = save_tiny_teacher(
        tmp_path / "teacher", adapter_width=16, summary_tokens=summary_tokens, map_channels=map_channels
    )
    router = Router.load(run_search(_config(teacher_folder, tmp_path / "run", steps=2, balance_prompts=8)))
    assert router.config.embed_dim == 384
    assert router.space.text_len == ENCODER_MAX_LENGTH + summary_tokens  # its MACs count the summary tokens
    teachers = load_teacher(teacher_folder)[1].text_encoder
    assert router.config.encoder.model_dump() == teachers.model_dump() | {"layers": [-1]}
    for record in [r for r in _records(tmp_path / "run") if r["phase"] != "balance"]:
        assert all(math.isfinite(record[k]) for k in LOSS_KEYS)


def test_min_width_holds_each_layers_strongest_gates_open(teacher_folder, tmp_path):
    router = Router.load(run_search(_config(teacher_folder, tmp_path / "run", min_width=0.5, balance_prompts=0)))
    unet, _ = load_teacher(teacher_folder)
    importance = search_module.l1_importance(unet, router.space)
    strongest = []
    for unit in router.space.width_units:
        sl = router.space.slices[unit.name]
        strongest += (importance[sl].topk(math.ceil(unit.num_gates / 2)).indices + sl.start).tolist()
    assert router.config.held_open == sorted(strongest)
    # However small the codes become, the floor stays.
    router.codes.set_architectures(nested_architectures(router.space, keeps=(0.1, 0.1)))
    assert (router.code_architectures()[:, strongest] == 1).all()


def test_code_budgets_hold_each_code_to_its_own_cost(teacher_folder, tmp_path):
    """With one target per code the codes part ways: the cheap code's gates close, the dear one's stay open (the
    batch-average resource loss alone has no reason to treat two codes differently)."""
    config = _config(
        teacher_folder,
        tmp_path / "run",
        steps=16,
        warmup_fraction=0.25,
        lr=0.5,
        lr_warmup_steps=0,
        budget=0.65,
        code_budgets=[0.3, 1.0],
        balance_prompts=0,
        weights={"resource": 20.0, "spread_std": 0.0, "spread_max": 0.0},
    )
    run_search(config)
    codes = [r for r in _records(tmp_path / "run") if r["phase"] == "codes"]
    assert codes and all(len(r["code_target_ratios"]) == 2 for r in codes)
    cheap, dear = codes[-1]["code_prunable_ratio"]
    target = codes[-1]["code_target_ratios"][0]
    assert cheap < target + 0.1 and dear > 0.9


@pytest.mark.parametrize(
    "targets, message", [([0.5], "1 targets for num_codes=2"), ([0.4, 0.5], "average 0.450, not the budget 0.6")]
)
def test_code_budgets_must_fit_the_codes_and_the_budget(teacher_folder, tmp_path, targets, message):
    with pytest.raises(ValueError, match=message):
        _config(teacher_folder, tmp_path / "run", budget=0.6, code_budgets=targets)


def test_a_target_below_what_the_width_floor_leaves_is_refused_before_training(teacher_folder, tmp_path):
    """A code held to less than the floor's cost sits at the floor and pulls the average over the budget (the sweep's
    aptp-0.4: targets 0.25 and 0.34 under a floor of 0.392 gave a routed average of 0.449)."""
    floor = {"min_width": 0.5, "prune_depth": False}
    config = _config(teacher_folder, tmp_path / "run", **floor, budget=0.5, code_budgets=[0.05, 0.95])
    with pytest.raises(ValueError, match=r"code_budgets: \[0.05\] below 0\.\d+ of the teacher's MACs.*min_width=0.5"):
        run_search(config)
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained
    with pytest.raises(ConfigError, match=r"^budget: \[0.05\] below"):
        run_search(_config(teacher_folder, tmp_path / "run", **floor, budget=0.05))


def test_a_difficulty_reference_under_what_l1_pruning_reaches_is_refused_before_training(teacher_folder, tmp_path):
    """Unset, the reference takes the cheapest target, held at the one-gate-a-unit floor (a code may go under it by
    dropping blocks); set under that floor, it is refused, naming the option."""
    config = _config(teacher_folder, tmp_path / "run", difficulty_weight=1.0, difficulty_reference=0.02)
    with pytest.raises(ConfigError, match=r"^difficulty_reference: 0.02 is below 0\.\d+ of the teacher's MACs"):
        run_search(config)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_a_search_with_difficulty_trains_the_routers_head_on_the_reference_errors(teacher_folder, tmp_path):
    """The head starts at zero (every prompt average) and the search moves it; each step logs its loss and whether the
    harder-rated prompts went to the costlier code; the saved router scores with it."""
    folder = run_search(_config(teacher_folder, tmp_path / "run", **DIFFICULTY))
    steps = [r for r in _records(tmp_path / "run") if r["phase"] != "balance"]
    for record in steps:
        assert math.isfinite(record["difficulty"]) and record["difficulty"] >= 0
        assert -1 <= record["difficulty_cost_correlation"] <= 1
    assert any(r["difficulty"] > 0 for r in steps)  # a sample alone in its timestep bin so far has target 0
    router = Router.load(folder)
    assert router.config.difficulty_weight == 1.0
    assert router.difficulty.out.weight.abs().sum() > 0
    prompts = [ShapesDomain(seed=1, split="train").sample(i).caption for i in range(8)]
    embedding = router.encoder.encode(prompts).pooled
    assert router.difficulty(embedding).unique().numel() > 1  # prompts rated apart


def test_without_a_difficulty_weight_the_search_has_no_head(teacher_folder, tmp_path):
    router = Router.load(run_search(_config(teacher_folder, tmp_path / "run", steps=2, balance_prompts=0)))
    assert router.difficulty is None
    assert all("difficulty" not in r for r in _records(tmp_path / "run"))
