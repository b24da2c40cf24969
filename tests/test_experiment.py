"""The comparison pipeline (scripts/compare_methods.py), its statistics, and the sigma finder."""

import json
import math
import os
import sys

import pytest
import torch

from nso_hf.experiment.plan import comparison_runs, equal_compute_steps, grid_runs, passes_per_micro_batch
from nso_hf.experiment.statistics import paired_difference, summarize, t_quantile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))


# Statistics: known answers -----------------------------------------------------------------------


def test_summary_and_paired_interval_by_hand():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert t_quantile(0.95, 2) == pytest.approx(4.302653, abs=1e-6)  # the t table, df = 2
    # Differences 1, 2, 3: mean 2, std 1, half-width 4.3027 / sqrt(3) = 2.4842: contains 0, a tie.
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert (d.low, d.high) == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    assert d.verdict == "tie"
    # Pairing: b moves with a (a shared seed effect), the differences barely vary: the interval is tight.
    a, b = [0.40, 0.50, 0.45], [0.38, 0.48, 0.43]
    assert paired_difference(a, b).verdict == "higher"
    assert paired_difference(b, a).verdict == "lower"
    one = paired_difference([1.0], [0.0])
    assert math.isnan(one.low) and one.verdict == "tie"
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])


# Plan: equal steps and equal compute ---------------------------------------------------------------


def test_passes_and_equal_compute():
    assert {m: passes_per_micro_batch(m) for m in ("none", "nso", "rwp", "sam", "asam", "flat_lora", "nso_merged")} == {
        "none": 1, "nso": 2, "rwp": 1, "sam": 2, "asam": 2, "flat_lora": 1, "nso_merged": 2,
    }
    methods = ["none", "nso", "rwp", "sam", "flat_lora"]
    assert [equal_compute_steps(m, 200, methods) for m in methods] == [400, 200, 400, 200, 400]
    assert equal_compute_steps("none", 200, ["none", "rwp"]) == 200  # no two-pass method: nothing to even out
    runs = comparison_runs(methods, {"nso": 0.01, "rwp": 0.01, "sam": 0.05, "flat_lora": 0.05}, [0, 1], 200)
    # Two-pass methods: one run serves both budgets; one-pass methods: 200 and 400 steps.
    assert len(runs) == 2 * (2 + 3 * 2)
    (nso,) = [r for r in runs if r.method == "nso" and r.seed == 0]
    assert (nso.steps, nso.budgets) == (200, ("equal_compute", "equal_steps"))
    assert sorted((r.steps, r.budgets) for r in runs if r.method == "none" and r.seed == 1) == [
        (200, ("equal_steps",)), (400, ("equal_compute",)),
    ]
    assert len({r.name for r in runs}) == len(runs)
    only = comparison_runs(methods, {}, [0], 200, ["equal_steps"])
    assert {r.steps for r in only} == {200}
    with pytest.raises(ValueError, match="budgets"):
        comparison_runs(methods, {}, [0], 200, ["equal_time"])
    grid = grid_runs({"nso": [0.01, 0.02], "sam": [0.05]}, 7, 50)
    assert [(r.method, r.strength, r.seed, r.role) for r in grid] == [
        ("nso", 0.01, 7, "validation"), ("nso", 0.02, 7, "validation"), ("sam", 0.05, 7, "validation"),
    ]


# Arguments, selection and the decision ----------------------------------------------------------------


def test_bad_experiment_arguments_fail_before_any_run():
    from nso_hf.experiment.compare import ExperimentArguments, parse_assignments

    with pytest.raises(ValueError, match="must include none"):
        ExperimentArguments(methods=["nso", "sam"])
    with pytest.raises(ValueError, match="unknown"):
        ExperimentArguments(methods=["none", "nso", "adam"])
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        ExperimentArguments(seeds=[0])
    with pytest.raises(ValueError, match="also a test seed"):
        ExperimentArguments(seeds=[0, 1], selection_seed=1)
    with pytest.raises(ValueError, match="overlap"):
        ExperimentArguments(validation_sources=["test", "x"], selection="test")
    with pytest.raises(ValueError, match="--primary"):
        ExperimentArguments(primary="validation")
    with pytest.raises(ValueError, match=r"--evaluations must be >= 1 .*got 0"):
        ExperimentArguments(best_checkpoint=True, evaluations=0)
    with pytest.raises(ValueError, match=r"--validation_samples must be >= 1, got 0: leave it unset"):
        ExperimentArguments(best_checkpoint=True, validation_samples=0)
    with pytest.raises(ValueError, match=r"--label_noise must be a fraction of the training rows in \[0, 1\), got 1.0"):
        ExperimentArguments(label_noise=1.0)
    assert parse_assignments(["nso=0.01,0.02", "sam=0.05"], "--grid") == {"nso": [0.01, 0.02], "sam": [0.05]}
    for bad in ("nso", "none=0.1", "nso=a", "nso=-0.1", "nso=inf"):
        with pytest.raises(ValueError, match="--grid"):
            parse_assignments([bad], "--grid")
    from nso_hf.experiment.compare import strength_plan

    tuned, fixed = strength_plan(ExperimentArguments(methods=["none", "nso", "sam"], grid=["sam=0.1,0.2"], strengths=["nso=0.02"]))
    assert (tuned, fixed) == ({"sam": [0.1, 0.2]}, {"nso": 0.02})
    with pytest.raises(ValueError, match=r"--grid names \['rwp'\]"):
        strength_plan(ExperimentArguments(methods=["none", "nso"], grid=["rwp=0.1"]))
    with pytest.raises(ValueError, match="one value for nso"):
        strength_plan(ExperimentArguments(strengths=["nso=0.01,0.02"]))


def test_best_checkpoint_runs_save_improvements_only_and_their_checkpoints_are_removed(tmp_path):
    from nso_hf.experiment.runner import checkpoint_tokens, remove_checkpoints

    plain = ["--method", "nso", "--save_strategy", "no"]
    best = [*plain, "--load_best_model_at_end", "true", "--eval_strategy", "steps"]
    assert checkpoint_tokens(plain) == [] and checkpoint_tokens([*best, "--load_best_model_at_end", "false"]) == []
    assert checkpoint_tokens(best) == ["--save_strategy", "best", "--save_total_limit", "1", "--save_only_model", "true"]
    for name in ("checkpoint-3", "checkpoint-12"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"0")
    (tmp_path / "cot_results.json").write_text("{}")
    remove_checkpoints(str(tmp_path), plain)  # a run that saved nothing of its own: its folder is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-3", "cot_results.json"]
    remove_checkpoints(str(tmp_path), best)
    assert [p.name for p in tmp_path.iterdir()] == ["cot_results.json"]
    remove_checkpoints(str(tmp_path / "not_started"), best)  # no folder yet: nothing to do


def test_arms_on_a_schedule_and_their_compute():
    from nso_hf.experiment.compare import ExperimentArguments
    from nso_hf.experiment.plan import Arm, Run
    from nso_hf.experiment.runner import run_tokens

    late = Arm.parse("nso@late0.750")
    assert (late.method, late.perturb_start, late.perturb_every, late.spec, late.label) == (
        "nso", 0.75, 1, "nso@late0.75", "nso late 0.75")
    assert Arm.parse("sam@late0.5@every2").label == "sam late 0.5 every 2" and not Arm.parse("rwp").scheduled
    # 200 steps, 150 plain (1 pass), 50 perturbed (2 passes): 250 passes per micro-batch slot.
    assert late.passes(200) == 250 and Arm.parse("nso").passes(200) == 400 and Arm.parse("none").passes(200) == 200
    # Equal compute gives a one-pass method exactly the passes the scheduled arm made ...
    arms = ["none", "rwp", "nso@late0.75"]
    assert [equal_compute_steps(a, 200, arms) for a in arms] == [250, 250, 200]
    # ... and a scheduled arm the steps whose passes equal the costliest arm's: 320 + 80 = 400.
    assert equal_compute_steps("nso@late0.75", 200, ["none", "nso", "nso@late0.75"]) == 320
    with pytest.raises(ValueError, match=r"No whole number of steps gives nso late 0.5 exactly 4 passes"):
        equal_compute_steps("nso@late0.5", 2, ["none", "nso", "nso@late0.5"])  # 2 steps make 3, 3 steps make 5
    runs = comparison_runs(arms, {"rwp": 0.01, "nso@late0.75": 0.01}, [0], 200)
    assert {(r.method, r.steps, r.budgets) for r in runs} == {
        ("none", 200, ("equal_steps",)), ("none", 250, ("equal_compute",)), ("rwp", 200, ("equal_steps",)),
        ("rwp", 250, ("equal_compute",)), ("nso@late0.75", 200, ("equal_compute", "equal_steps")),
    }
    (run,) = [r for r in runs if r.method == "nso@late0.75"]
    assert run.name == "test/nso_late0.75_sigma0.01_steps200_seed0"
    tokens = run_tokens(run, [], "out", ["test"], [])
    assert tokens[:6] == ["--method", "nso", "--perturb_start", "0.75", "--perturb_every", "1"]
    assert run_tokens(Run("nso", 0.01, 0, 200, "test"), [], "out", ["test"], [])[:3] == ["--method", "nso", "--seed"]
    for spec, match in (("nso@early0.5", r"'early0.5' is not late<fraction> or every<n>"),
                        ("nso@late1.5", r"NSOConfig.perturb_start must be a float in \[0, 1\), got 1.5"),
                        ("none@every2", r"plain training has no passes to schedule"),
                        ("nsoo", r"unknown method 'nsoo'")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Arm.parse(spec)
    with pytest.raises(ValueError, match=r"must include none .* and the --focus arm nso@late0.75"):
        ExperimentArguments(methods=["none", "nso"], focus="nso@late0.75")


def test_worker_pool_takes_the_costliest_runs_first():
    """Runs go to the pool most passes first, in plan order among equals (make demo: NSO's three, then Trainer's)."""
    from nso_hf.experiment.runner import costliest_first

    runs = comparison_runs(["none", "nso", "nso@late0.5"], {"nso": 0.01, "nso@late0.5": 0.01}, [0, 1], 10)
    ordered = [run for run, _ in costliest_first([(run, [run.name]) for run in runs])]
    # The equal-compute runs (20 passes each) by seed as planned, then late 0.5 at 10 steps (15), then none at 10 steps.
    assert [(r.method, r.steps, r.seed) for r in ordered] == [
        ("none", 20, 0), ("nso", 10, 0), ("nso@late0.5", 13, 0), ("none", 20, 1), ("nso", 10, 1), ("nso@late0.5", 13, 1),
        ("nso@late0.5", 10, 0), ("nso@late0.5", 10, 1), ("none", 10, 0), ("none", 10, 1)]
    demo = comparison_runs(["none", "nso"], {"nso": 0.01}, [0, 1, 2], 200, budgets=["equal_steps"])
    assert [r.method for r, _ in costliest_first([(r, []) for r in demo])] == ["nso"] * 3 + ["none"] * 3


def test_selection_prefers_the_weaker_strength_on_a_tie_and_the_decision_rule():
    from nso_hf.experiment.compare import select_strengths
    from nso_hf.experiment.plan import Run
    from nso_hf.experiment.report import decision

    runs = [Run("nso", s, 9, 10, "validation") for s in (0.01, 0.02, 0.05)]
    accuracy = {0.01: 0.40, 0.02: 0.40, 0.05: 0.30}
    results = {r.name: {"eval": {"validation": {"exact_match": accuracy[r.strength]}}} for r in runs}
    chosen, table = select_strengths(results, runs, "validation")
    assert chosen == {"nso": 0.01} and [row["strength"] for row in table["nso"]] == [0.01, 0.02, 0.05]
    higher, tie = {"verdict": "higher"}, {"verdict": "tie"}
    assert decision({"none": higher, "sam": higher}).startswith("nso wins")
    assert decision({"none": higher, "sam": tie}) == "nso does not win: it wins over none, ties with sam."


# The whole pipeline, tiny ----------------------------------------------------------------------------


def test_quick_comparison_end_to_end(tiny_model_dir, tmp_path, one_thread):
    from compare_methods import main

    out = tmp_path / "cmp"
    main(["--quick", "--output_dir", str(out), "--methods", "none", "nso", "sam", "--model_name_or_path", tiny_model_dir])
    results = json.loads((out / "results.json").read_text())
    assert results["strengths"] == {"none": None, "nso": 0.01, "sam": 0.05}
    assert set(results["per_seed"]) == {"equal_compute", "equal_steps"}
    for budget, table in results["per_seed"].items():
        assert set(table) == {"none", "nso", "sam"}
        for method, metrics in table.items():
            assert len(metrics["accuracy_test"]) == 2 and len(metrics["accuracy_ood"]) == 2  # two seeds
            for key in ("hessian_trace", "top_eigenvalue", "noise_stability", "final_loss", "train_loss"):
                assert all(math.isfinite(v) for v in metrics[key]), (budget, method, key)
    steps = {(r["method"], tuple(r["budgets"])): r["steps"] for r in results["runs"] if r["seed"] == 0}
    assert steps[("none", ("equal_steps",))] == 2 and steps[("none", ("equal_compute",))] == 4
    assert steps[("nso", ("equal_compute", "equal_steps"))] == 2
    # The comparisons are computed from the per-seed numbers, not copied from anywhere.
    table = results["per_seed"]["equal_steps"]
    diff = results["comparisons"]["equal_steps"]["versus_reference"]["nso"]["hessian_trace"]
    expected = paired_difference(table["nso"]["hessian_trace"], table["none"]["hessian_trace"])
    assert (diff["mean"], diff["low"]) == (expected.mean, expected.low)
    text = (out / "results.md").read_text()
    assert "Decision:" in text and "Primary metric" in text and "95% t-interval" in text
    assert (out / "results.png").stat().st_size > 1000
    # A second call finds every run done and runs nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("cot_results.json")}
    main(["--quick", "--output_dir", str(out), "--methods", "none", "nso", "sam", "--model_name_or_path", tiny_model_dir])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("cot_results.json")} == before
    # The same folder with other options would mix two experiments: refused, nothing overwritten.
    with pytest.raises(SystemExit, match="holds a run made with other options"):
        main(["--quick", "--output_dir", str(out), "--methods", "none", "nso", "sam", "--model_name_or_path",
              tiny_model_dir, "--learning_rate", "0.01"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("cot_results.json")} == before


def test_quick_comparison_of_a_scheduled_arm_at_equal_compute(tiny_model_dir, tmp_path, one_thread):
    """nso@late0.5 over 2 steps makes 1 + 2 passes: plain training gets exactly 3 steps; passes are checked as recorded."""
    from compare_methods import main

    out = tmp_path / "late"
    main(["--quick", "--output_dir", str(out), "--methods", "none", "nso@late0.5", "--focus", "nso@late0.5",
          "--budgets", "equal_compute", "--model_name_or_path", tiny_model_dir, "--report_name", "late"])  # fmt: skip
    assert not (out / "results.json").exists()
    results = json.loads((out / "late.json").read_text())
    assert results["strengths"] == {"none": None, "nso@late0.5": 0.01}
    steps = {r["method"]: r["steps"] for r in results["runs"] if r["seed"] == 0}
    assert steps == {"none": 3, "nso@late0.5": 2}
    table = results["per_seed"]["equal_compute"]
    # 4 rows per step at batch 4 in --quick: one micro-batch per step
    assert table["none"]["forward_backward_passes"] == table["nso@late0.5"]["forward_backward_passes"] == [3.0, 3.0]
    late = json.loads((out / "test" / "nso_late0.5_sigma0.01_steps2_seed0" / "cot_results.json").read_text())
    assert late["nso_config"]["perturb_start"] == 0.5 and late["train"]["forward_backward_passes"] == 3
    text = (out / "late.md").read_text()
    assert "nso late 0.5 minus each arm" in text and "| nso late 0.5 | sigma 0.01 | 2 |" in text


def test_quick_clip_comparison_end_to_end(tmp_path, one_thread):
    """--task clip: pretrain_clip.py runs, chosen on the validation rows, scored on test and the rotated ood split;
    with the best checkpoint by zero-shot accuracy on the validation rows, label noise and the deployed-model measures."""
    from compare_methods import main

    out = tmp_path / "clip"
    main(["--task", "clip", "--quick", "--output_dir", str(out), "--methods", "none", "nso", "--best_checkpoint", "true",
          "--validation_samples", "8", "--label_noise", "0.25", "--robustness", "true"])
    results = json.loads((out / "results.json").read_text())
    assert results["strengths"] == {"none": None, "nso": 0.01} and results["arguments"]["task"] == "clip"
    assert results["primary_metric"] == "zero-shot accuracy on 'test' at equal compute"
    run = json.loads((out / "test" / "none_steps2_seed0" / "eval_results.json").read_text())
    assert set(run["eval"]) == {"test", "ood"} and run["eval"]["test"]["num_images"] == 16
    assert "--eval_sources" in run["command_line"] and run["steps"] == 2
    assert run["selection"]["metric"] == "zero_shot_accuracy" and run["selection"]["validation_examples"] == 8
    assert [p["step"] for p in run["selection"]["curve"]] == [1, 2] and run["label_noise"]["rows_changed"] == 16
    assert set(run["robustness"]["sources"]) == {"test", "ood"}
    assert not [p for p in (out / "test" / "none_steps2_seed0").iterdir() if p.name.startswith("checkpoint-")]
    for key in ("best_step", "q4_0_drop_test", "rows_relabelled"):
        assert len(results["per_seed"]["equal_compute"]["nso"][key]) == 2
    selection = json.loads((out / "validation" / "nso_sigma0.01_steps2_seed1000" / "eval_results.json").read_text())
    assert set(selection["eval"]) == {"validation", "ood_validation"} and selection["flatness"] is None
    for budget, table in results["per_seed"].items():
        for method, metrics in table.items():
            assert len(metrics["accuracy_test"]) == 2 and all(0 <= a <= 1 for a in metrics["accuracy_ood"])
            hits = [a * 16 for a in metrics["accuracy_test"]]  # a share of 16 images: whole numbers
            assert all(abs(h - round(h)) < 1e-4 for h in hits), hits
            for key in ("hessian_trace", "top_eigenvalue", "noise_stability", "final_loss", "train_loss", "seconds_per_step"):
                assert all(math.isfinite(v) for v in metrics[key]), (budget, method, key)
    text = (out / "results.md").read_text()
    assert "zero-shot accuracy" in text and "## Equal compute" in text
    with pytest.raises(SystemExit, match="merged LoRA weight"):  # no LoRA in the CLIP task
        main(["--task", "clip", "--quick", "--output_dir", str(tmp_path / "z"), "--methods", "none", "nso", "flat_lora"])


def test_a_bad_finetune_option_fails_before_any_run(tmp_path, capsys):
    from compare_methods import main

    with pytest.raises(SystemExit):
        main(["--quick", "--output_dir", str(tmp_path / "x"), "--lora_rank", "4"])
    assert not (tmp_path / "x" / "validation").exists()
    # The default task trains every weight: Flat-LoRA has no LoRA weight to merge there.
    with pytest.raises(SystemExit, match=r"\['flat_lora'\] perturb the merged LoRA weight"):
        main(["--quick", "--output_dir", str(tmp_path / "y"), "--methods", "none", "nso", "flat_lora"])
    assert not (tmp_path / "y" / "validation").exists()


# The sigma finder -------------------------------------------------------------------------------------


class _Bowl(torch.nn.Module):
    """L(w) = 1 + ||w||^2 / 2 at w = 0: E[L(w + U)] - L(w) = sigma^2 n / 2 exactly in expectation."""

    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, x):
        return type("Out", (), {"loss": 1 + 0.5 * (self.w**2).sum() + 0 * x.sum()})()


def test_sigma_finder_follows_its_rule_on_a_known_curve():
    from nso_hf.sigma_finder import find_sigma, recommend

    n = 20000  # ||U||^2 concentrates: the measured increase is within a few percent of sigma^2 n / 2
    model = _Bowl(n)
    batches = [{"x": torch.zeros(1, dtype=torch.float64)}]
    search = find_sigma(model, batches, grid=(0.001, 0.002, 0.003, 0.01), target=0.05, num_draws=2)
    for sigma, increase in zip(search.grid, search.increase):
        assert increase == pytest.approx(sigma**2 * n / 2, rel=0.05)
    # 5% of L = 0.05: sigma^2 n / 2 <= 0.05 holds for 0.001 (0.01) and 0.002 (0.04), not 0.003 (0.09).
    assert search.sigma == 0.002 and search.base_loss == 1.0
    assert torch.equal(model.w, torch.zeros(n, dtype=torch.float64))  # restored exactly
    assert "0.002 **<-**" in search.table()
    assert recommend([0.1, 0.2], [1.0, 2.0], 1.0, 0.05)[0] is None
    assert recommend([0.1, 0.2], [0.0, 0.01], 1.0, 0.05) == (0.2, "the largest sigma of the grid stays within 5%: larger values may be allowed too")
    with pytest.raises(ValueError, match="grid"):
        find_sigma(model, batches, grid=(0.0, 0.01))


def test_find_sigma_script_on_a_cot_model(tiny_model_dir, tmp_path, capsys, one_thread):
    from find_sigma import main

    report = tmp_path / "sigma.json"
    main(["--model_name_or_path", tiny_model_dir, "--sigma_grid", "0.01", "0.1", "--num_draws", "2",
          "--num_batches", "1", "--output_dir", str(tmp_path / "o"), "--output_json", str(report)])
    out = capsys.readouterr().out
    search = json.loads(report.read_text())
    assert search["grid"] == [0.01, 0.1] and len(search["increase"]) == 2
    assert "Recommended: --sigma" in out or "No recommendation" in out


@pytest.mark.distributed
def test_runs_through_a_launcher(tiny_model_dir, tmp_path):
    """--launcher runs each run as its own command (here plain python; on GPUs `accelerate launch`)."""
    from compare_methods import main

    out = tmp_path / "launched"
    main(["--quick", "--output_dir", str(out), "--methods", "none", "nso", "--budgets", "equal_steps",
          "--launcher", sys.executable, "--model_name_or_path", tiny_model_dir])
    results = json.loads((out / "results.json").read_text())
    assert set(results["per_seed"]) == {"equal_steps"} and len(results["runs"]) == 4
    assert results["primary_metric"] == "strict accuracy on 'test' at equal steps"
    assert all((out / r["name"] / "log.txt").exists() for r in results["runs"])


@pytest.mark.distributed  # two worker processes at once: run with the launcher tests, after the parallel half
def test_worker_processes_give_the_numbers_of_in_process_runs(tiny_model_dir, tmp_path, one_thread):
    """--workers 2 runs each run in a fresh process forked from a server that has imported the task's modules:
    the same numbers as the same runs in this process, and each run's own peak memory."""
    from nso_hf.experiment.plan import Run
    from nso_hf.experiment.runner import run_all, run_tokens, worker_context
    from nso_hf.experiment.tasks import TASKS

    task = TASKS["cot"]
    if sys.platform.startswith("linux"):
        assert worker_context(task).get_start_method() == "forkserver"
    base = ["--config", os.path.join(REPO, "scripts", "configs", task.config), *task.quick_tokens,
            "--model_name_or_path", tiny_model_dir, "--hessian_trace_probes", "2", "--hessian_trace_batches", "1"]
    runs = [Run("none", None, 0, 2, "test"), Run("nso", 0.01, 1, 2, "test")]
    results = {}
    for workers in (0, 2):
        root = str(tmp_path / f"workers{workers}")
        results[workers] = run_all([(r, run_tokens(r, base, root, ["test"], [])) for r in runs], root, workers)
    for run in runs:
        here, forked = results[0][run.name], results[2][run.name]
        assert forked["train"]["train_loss"] == here["train"]["train_loss"]
        assert forked["hessian_trace"] == here["hessian_trace"] and forked["eval"] == here["eval"]
        assert forked["peak_memory_kind"] == "process_peak_rss" and forked["peak_memory_mib"] > 100
        assert here["peak_memory_kind"].startswith("not measured")


@pytest.mark.slow  # four more processes; the launcher path is the CoT test's, the CLIP task's in-process run is tested by default
def test_clip_runs_through_a_launcher(tmp_path):
    """The CLIP task through a launcher: pretrain_clip.py as its own command, its JSON read back."""
    from compare_methods import main

    clip = tmp_path / "launched_clip"
    main(["--task", "clip", "--quick", "--output_dir", str(clip), "--methods", "none", "nso", "--budgets", "equal_steps",
          "--launcher", sys.executable])
    results = json.loads((clip / "results.json").read_text())
    assert results["primary_metric"] == "zero-shot accuracy on 'test' at equal steps" and len(results["runs"]) == 4
    run = json.loads((clip / "test" / "nso_sigma0.01_steps2_seed1" / "eval_results.json").read_text())
    assert run["peak_memory_kind"].startswith("not measured") and set(run["eval"]) == {"test", "ood"}


def test_quick_comparison_with_best_checkpoint_label_noise_and_robustness(tiny_model_dir, tmp_path, one_thread):
    """Every test run scores the validation rows during training (evaluations spaced by its own steps) and ends on
    its best checkpoint (saved in its own folder, deleted once its results are written), trains on the same
    relabelled rows, and measures the deployed model; the report gives each measure with paired intervals; a
    second call runs nothing."""
    from compare_methods import main

    out = tmp_path / "conv"
    argv = ["--quick", "--output_dir", str(out), "--methods", "none", "nso", "--model_name_or_path", tiny_model_dir,
            "--best_checkpoint", "true", "--evaluations", "2", "--validation_samples", "3", "--label_noise", "0.25",
            "--robustness", "true"]
    main(argv)
    results = json.loads((out / "results.json").read_text())
    runs = [r for r in results["runs"] if r["role"] == "test"]
    assert sorted((r["method"], r["steps"]) for r in runs) == [("none", 2)] * 2 + [("none", 4)] * 2 + [("nso", 2)] * 2
    for r in runs:
        run = json.loads((out / r["name"] / "cot_results.json").read_text())
        line = run["command_line"]
        assert line[line.index("--label_noise") + 1] == "0.25" and line[line.index("--robustness") + 1] == "true"
        assert line[-6:] == ["--save_strategy", "best", "--save_total_limit", "1", "--save_only_model", "true"]
        assert run["data"]["label_noise"]["rows_changed"] == 16  # a quarter of the 64 quick training rows
        selection = run["selection"]
        assert selection["validation_source"] == "validation" and selection["validation_examples"] == 3
        # Two evaluations per run, every steps // 2 of its own steps: at steps 1, 2 or 2, 4 (equal compute).
        assert [p["step"] for p in selection["curve"]] == [r["steps"] // 2, r["steps"]]
        scores = [p["exact_match"] for p in selection["curve"]]
        assert selection["final_weights_step"] == selection["curve"][scores.index(max(scores))]["step"]
        assert set(run["robustness"]["sources"]) == {"test", "ood"}
        assert not [p for p in (out / r["name"]).iterdir() if p.name.startswith("checkpoint-")]  # cleaned up
    selection_run = json.loads((out / "validation" / "nso_sigma0.01_steps2_seed1000" / "cot_results.json").read_text())
    assert selection_run["selection"] is None and selection_run["data"]["label_noise"]["rows_changed"] == 16
    for budget in ("equal_steps", "equal_compute"):
        table = results["per_seed"][budget]
        for key in ("q8_0_test", "q4_0_drop_ood", "noise_drop_test", "best_step", "best_fraction", "eval_seconds",
                    "robustness_seconds"):
            assert len(table["nso"][key]) == 2 and all(math.isfinite(v) for v in table["nso"][key]), key
        assert table["none"]["rows_relabelled"] == [16.0, 16.0]
        diff = results["comparisons"][budget]["versus_reference"]["nso"]["q4_0_drop_test"]
        expected = paired_difference(table["nso"]["q4_0_drop_test"], table["none"]["q4_0_drop_test"])
        assert (diff["mean"], diff["low"]) == (expected.mean, expected.low)
    text = (out / "results.md").read_text()
    assert "| method | Q8_0 acc. test |" in text and "best step / steps" in text and "validation eval s" in text
    before = {p: p.stat().st_mtime_ns for p in out.rglob("cot_results.json")}
    main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("cot_results.json")} == before


def test_late_arm_start_chosen_on_validation(tiny_model_dir, tmp_path, one_thread):
    """`nso@late` with --start_grid: each start runs at the strength chosen for nso, the best on validation becomes the
    arm of the test runs (a tie goes to the later start); bad grids fail before any run."""
    from compare_methods import main

    from nso_hf.experiment.compare import ExperimentArguments, select_start
    from nso_hf.experiment.plan import Run

    with pytest.raises(ValueError, match="--start_grid goes with exactly one arm"):
        ExperimentArguments(methods=["none", "nso", "nso@late"])
    with pytest.raises(ValueError, match="--start_grid goes with exactly one arm"):
        ExperimentArguments(methods=["none", "nso"], start_grid=[0.5])
    with pytest.raises(ValueError, match="add nso to --methods"):
        ExperimentArguments(methods=["none", "nso@late"], focus="nso@late", start_grid=[0.5])
    with pytest.raises(ValueError, match="perturb_start"):
        ExperimentArguments(methods=["none", "nso", "nso@late"], start_grid=[1.5])
    with pytest.raises(ValueError, match="No whole number of steps gives nso late 0.25"):  # 1.75 x n passes never makes 400
        ExperimentArguments(methods=["none", "nso", "nso@late"], start_grid=[0.25, 0.5], steps=200)
    ExperimentArguments(methods=["none", "nso", "nso@late"], start_grid=[0.25, 0.5, 0.75], steps=150)

    runs = [Run(f"nso@late{s}", 0.01, 9, 10, "validation") for s in (0.25, 0.5, 0.75)]
    accuracy = {0.25: 0.30, 0.5: 0.40, 0.75: 0.40}
    results = {r.name: {"eval": {"validation": {"exact_match": accuracy[r.arm.perturb_start]}}} for r in runs}
    arm, table = select_start(results, runs, "validation")
    assert arm == "nso@late0.75" and [row["validation"] for row in table] == [0.30, 0.40, 0.40]

    # Two steps: starts 0.5 and 0.9 both perturb step 1 only, so their runs are identical and the later start wins.
    out = tmp_path / "late"
    main(["--quick", "--output_dir", str(out), "--methods", "none", "nso", "nso@late", "--start_grid", "0.5", "0.9",
          "--budgets", "equal_steps", "--model_name_or_path", tiny_model_dir])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    late = results["start_selection"]
    assert [row["perturb_start"] for row in late["starts"]] == [0.5, 0.9] and late["chosen"] == "nso@late0.9"
    assert late["starts"][0]["validation"] == late["starts"][1]["validation"]
    assert results["strengths"] == {"none": None, "nso": 0.01, "nso@late0.9": 0.01}
    assert (out / "validation" / "nso_late0.5_sigma0.01_steps2_seed1000" / "cot_results.json").exists()
    assert set(results["per_seed"]["equal_steps"]) == {"none", "nso", "nso@late0.9"}
    text = (out / "results.md").read_text()
    assert "- nso late (its start, at nso's sigma 0.01): start 0.5:" in text and "Strengths given" not in text
    assert results["arguments"]["methods"] == ["none", "nso", "nso@late"] and results["focus"] == "nso"
    # --focus the late arm: its chosen spelling is the focus of the report
    main(["--quick", "--output_dir", str(out), "--methods", "none", "nso", "nso@late", "--start_grid", "0.5", "0.9",
          "--budgets", "equal_steps", "--focus", "nso@late", "--report_name", "late", "--model_name_or_path", tiny_model_dir])
    late_report = json.loads((out / "late.json").read_text())
    assert late_report["focus"] == "nso@late0.9" and set(late_report["comparisons"]["equal_steps"]["focus_versus"]) == {"none", "nso"}
    assert "nso late 0.9 minus each arm" in (out / "late.md").read_text()
