"""Mixed precision: sensitivity table, knapsack allocation, budgets in convert, the plan in .qsd files."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import qsdcompress as q
from qsdcompress.cli import main
from qsdcompress.errors import QsdError
from qsdcompress.mixed import (Budget, PrefixCache, Problem, Quantizer, convert_to_budget, layer_groups,
                               measure_sensitivity, monotone, search_drop, smallest, solve, validation_batches)
from qsdcompress.mixed.plan import Planner
from qsdcompress.quant import QuantConfig, is_quant_layer, quant_bits, weight_layers

BITS = (1, 2, 4, 8)  # 1 keeps tight budgets reachable
SAMPLES = 8
FAST = dict(calib_samples=32)  # conversions in these tests calibrate on few images


def independent_size_bytes(model: torch.nn.Module) -> int:
    """Size by its definition (docs/method.md §8), written out here without sizing.model_size:
    quantized weights at b bits plus one float32 scale per output channel, every other parameter
    (quantizer scales excluded) float32."""
    bits = 0
    quant_weights = set()
    for name, m in model.named_modules():
        if is_quant_layer(m):
            bits += m.weight.numel() * quant_bits(m) + 32 * m.weight.shape[0]
            quant_weights.add(f"{name}.weight")
    for name, p in model.named_parameters():
        if name not in quant_weights and "weight_quant" not in name:
            bits += 32 * p.numel()
    return -(-bits // 8)


@pytest.fixture(scope="module")
def digits():
    return q.load()


@pytest.fixture(scope="module")
def table_file(digits, tmp_path_factory):
    """One small sensitivity table of the bundled model, shared by the budget tests."""
    batches = validation_batches(digits, "digits", SAMPLES)
    table, _, _ = measure_sensitivity(digits, batches, BITS)
    path = tmp_path_factory.mktemp("sens") / "sens.json"
    path.write_text(json.dumps(table.to_dict()))
    return path


def budget(table_file, **kw) -> Budget:
    return Budget(candidate_bits=list(BITS), samples=SAMPLES, sensitivity=str(table_file), **kw)


def test_groups_cover_every_layer_once_and_follow_the_structure(digits):
    groups = layer_groups(digits)
    names = [n for g in groups for n in g.layers]
    assert sorted(names) == sorted(n for n, _ in weight_layers(digits))
    by = {g.name: g for g in groups}
    for block in ("block3.0", "block3.1", "block3.2", "block4.0"):
        assert len(by[f"{block}.attn.qkv"].layers) == 9        # q, k and v RepConvs: 3 convs each
        assert len(by[f"{block}.attn.proj"].layers) == 3
    assert by["head"].layers == ("head",) and by["downsample1_1.encode_conv"].input is None


def test_prefix_replay_gives_the_logits_of_a_full_run(digits):
    batches = validation_batches(digits, "digits", 6, batch_size=3)
    groups = layer_groups(digits)
    cache = PrefixCache(digits, batches, {g.name: list(g.layers) for g in groups})
    quantizer = Quantizer(digits)
    g = next(g for g in groups if g.name == "block3.1.attn.proj")
    assert cache.skips[g.name], "the modules before block3.1's projection are replayed"
    with quantizer.applied({n: 2 for n in g.layers}), torch.no_grad():
        replayed = cache.run(g.name, batches)
        full = [digits(x) for x, _ in batches]
    for a, b in zip(replayed, full):
        assert torch.equal(a, b)
    assert not any(is_quant_layer(m) for _, m in weight_layers(digits))  # restored


def test_sensitivity_output_keys_shape_and_plot(tmp_path):
    r = CliRunner().invoke(main, ["sensitivity", "--candidate-bits", "2,8", "--samples", "4", "--json",
                                  "--plot", str(tmp_path / "plots"), "-o", str(tmp_path / "s.json"),
                                  "--workdir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["metric"] == "kl" and d["bits"] == [2, 8] and d["samples"] == 4
    assert len(d["groups"]) == len(layer_groups(q.load()))
    for g in d["groups"]:
        assert {"name", "layers", "params", "damage", "top1"} <= set(g)
        assert set(g["damage"]) == {"2", "8"} and all(v >= 0 for v in g["damage"].values())
    first = d["groups"][0]["damage"]
    assert first["2"] > first["8"]  # the stem conv at 2 bits hurts more than at 8
    assert (tmp_path / "plots" / "sensitivity.png").stat().st_size > 0
    assert json.loads((tmp_path / "s.json").read_text())["groups"] == d["groups"]


def test_solver_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        G, K = 4, 3
        damage = monotone(rng.random((G, K))[:, ::-1].copy())
        size = np.sort(rng.integers(1, 50, (G, K)), axis=1).astype(float)
        p = Problem([f"g{i}" for i in range(G)], [1, 2, 4], damage, size, 100)
        cap = 100 + float(size.sum(1).mean() * 2.5)
        p.limits["size_bits"] = cap
        best = min((c for c in itertools.product(range(K), repeat=G) if p.totals(c)["size_bits"] <= cap),
                   key=lambda c: (round(p.totals(c)["damage"], 12), p.totals(c)["size_bits"]))
        got = solve(p)
        assert got is not None
        assert p.totals(got)["damage"] == pytest.approx(p.totals(best)["damage"], abs=1e-9)
        assert p.totals(got)["size_bits"] == p.totals(best)["size_bits"]


def test_monotone_never_lets_fewer_bits_look_better():
    d = monotone(np.array([[0.5, 0.1, 0.3, 0.0]]))
    assert d.tolist() == [[0.5, 0.3, 0.3, 0.0]]


def test_tighter_budgets_never_give_larger_plans(digits, table_file):
    planner = Planner(digits, QuantConfig(**FAST), budget(table_file, target_size_mb=1.0))
    p = planner.problem
    sizes = []
    for mb in (0.30, 0.26, 0.22, 0.2, 0.18, 0.15, 0.12):
        p.limits["size_bits"] = 8 * mb * 1e6
        choice = solve(p)
        assert choice is not None
        sizes.append(p.totals(choice)["size_bits"])
        assert sizes[-1] <= p.limits["size_bits"]
    assert sizes == sorted(sizes, reverse=True)


def test_size_budget_met_and_plan_round_trips(digits, table_file, tmp_path):
    target = 0.21
    m, plan = convert_to_budget(digits, QuantConfig(**FAST), budget(table_file, target_size_mb=target))
    assert independent_size_bytes(m) <= target * 1e6
    assert plan["size_bytes"] == independent_size_bytes(m) == plan["predicted"]["size_bytes"]
    widths = {quant_bits(x) for _, x in weight_layers(m) if is_quant_layer(x)}
    assert len(widths) > 1 and plan["budget_met"]
    assert plan["measured"]["kl"] >= 0 and plan["predicted"]["kl"] >= 0
    q.save(m, tmp_path / "mp.qsd", kind="converted")
    back = q.load(tmp_path / "mp.qsd")
    assert back.qsd_quant_meta["mixed_precision"] == json.loads(json.dumps(plan))
    assert {n: quant_bits(x) for n, x in weight_layers(back)} == plan["layer_bits"]
    assert independent_size_bytes(back) == plan["size_bytes"]


def test_overrides_win_over_the_plan(digits, table_file):
    cfg = QuantConfig(first_last_bits=8, layer_bits={"block4.*": 2}, skip=["downsample2.encode_conv"], **FAST)
    m, plan = convert_to_budget(digits, cfg, budget(table_file, target_size_mb=0.2))
    bits = {n: (quant_bits(x) if is_quant_layer(x) else 32) for n, x in weight_layers(m)}
    assert bits["downsample1_1.encode_conv"] == 8 and bits["head"] == 8
    assert bits["downsample2.encode_conv"] == 32
    assert all(b == 2 for n, b in bits.items() if n.startswith("block4."))
    assert independent_size_bytes(m) <= 0.2e6 and plan["budget_met"]
    assert "head" not in plan["groups"] and plan["fixed_layers"]["head"] == 8


def test_energy_budget_met_with_the_report_energy(digits, table_file):
    planner = Planner(digits, QuantConfig(**FAST), budget(table_file, target_energy_mj=1.0))
    lo = smallest(planner.problem, "energy_pj") * 1e-9
    target = lo * 1.15
    _, plan = convert_to_budget(digits, QuantConfig(**FAST), budget(table_file, target_energy_mj=target))
    assert plan["measured"]["energy_mj"] <= target and plan["budget_met"]


def test_max_drop_search_returns_the_smallest_plan_that_passes():
    G, K = 3, 3
    damage = monotone(np.array([[3.0, 1.0, 0.0], [2.0, 0.5, 0.0], [1.0, 0.2, 0.0]]))
    size = np.array([[1, 2, 4]] * G, dtype=float)
    p = Problem(["a", "b", "c"], [1, 2, 4], damage, size, 0)
    choice, history = search_drop(p, lambda c: float(p.totals(c)["damage"]), max_drop=1.0)
    assert p.totals(choice)["damage"] <= 1.0 and history
    feasible = [c for c in itertools.product(range(K), repeat=G) if p.totals(c)["damage"] <= 1.0]
    assert p.totals(choice)["size_bits"] == min(p.totals(c)["size_bits"] for c in feasible)
    with pytest.raises(QsdError, match="smallest validation top-1 drop reachable"):
        search_drop(p, lambda c: 5.0, max_drop=1.0)


@pytest.mark.parametrize("kw,needle", [(dict(target_size_mb=0.01), "smallest reachable size is"),
                                       (dict(target_energy_mj=1e-6), "smallest reachable energy")])
def test_impossible_budget_is_one_clear_error(digits, table_file, kw, needle):
    with pytest.raises(QsdError, match=needle):
        convert_to_budget(digits, QuantConfig(**FAST), budget(table_file, **kw))


def test_impossible_budget_on_the_command_line(table_file, tmp_path):
    r = CliRunner().invoke(main, ["convert", "--target-size-mb", "0.01", "--sensitivity", str(table_file),
                                  "--candidate-bits", "1,2,4,8", "--sensitivity-samples", "8",
                                  "--workdir", str(tmp_path)])
    assert r.exit_code == 2
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "smallest reachable size is" in lines[0] and "MB" in lines[0], r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args", [["--target-size-mb", "-1"], ["--max-drop", "nan"], ["--candidate-bits", "0,9"]])
def test_bad_budget_options(args, tmp_path):
    r = CliRunner().invoke(main, ["convert", *args, "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, r.output


def test_a_table_of_another_model_is_refused(digits, table_file, tmp_path):
    d = json.loads(table_file.read_text())
    d["groups"][0]["layers"] = ["nothing"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    with pytest.raises(QsdError, match="does not fit this model"):
        convert_to_budget(digits, QuantConfig(**FAST), budget(other, target_size_mb=0.2))


def test_api_convert_takes_a_budget(digits, table_file):
    m = q.convert(digits, target_size_mb=0.2, samples=SAMPLES, sensitivity=str(table_file),
                  candidate_bits=list(BITS), calib_samples=32)
    assert independent_size_bytes(m) <= 0.2e6
    assert m.qsd_quant_meta["mixed_precision"]["budget"]["target_size_mb"] == 0.2


def _convert_cli(tmp_path, *extra):
    r = CliRunner().invoke(main, ["convert", "--target-size-mb", "0.22", "--json", "--workdir", str(tmp_path / "wd"),
                                  *extra])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["size_bytes"] < 0.22e6 and d["plan"]["size_bytes"] == d["size_bytes"]
    assert len([b for b in d["layers_per_bits"] if int(b) < 32]) > 1
    assert set(d["plan"]["layer_bits"].values()) - {32} and len(set(d["plan"]["layer_bits"].values())) > 1
    assert {"predicted", "measured", "groups", "budget_met"} <= set(d["plan"])
    back = q.load(d["output"])
    assert independent_size_bytes(back) == d["size_bytes"]
    return d


def test_convert_target_size_on_the_command_line(tmp_path):
    _convert_cli(tmp_path, "--sensitivity-samples", "4", "--candidate-bits", "2,4,8", "--calib-samples", "32", "--no-eval")


@pytest.mark.slow
def test_convert_target_size_022_exactly_as_the_issue_checks(tmp_path):
    """`qsdcompress convert --target-size-mb 0.22 --json` from an empty directory, all defaults."""
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        _convert_cli(tmp_path)
    finally:
        os.chdir(old)


def test_max_drop_measures_plans_on_validation(digits, table_file):
    """With a drop anything meets, the plan is the smallest reachable; measured drops are recorded."""
    planner = Planner(digits, QuantConfig(**FAST), budget(table_file, max_drop=100.0))
    choice, history = planner.choose()
    assert planner.problem.totals(choice)["size_bits"] == smallest(planner.problem, "size_bits")
    assert len(history) == 2 and all(h["drop_points"] <= 100 for h in history)
    assert history[0]["drop_points"] < history[1]["drop_points"]  # least-damage plan vs all 1-bit
