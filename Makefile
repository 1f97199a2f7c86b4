# Set-up and entry points. `make demo` and `make test` are the README's two commands: each creates the
# virtual environment on first use (CPU torch first, so no CUDA build is pulled), then runs its job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. on a machine without a local CPU wheel:
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# C++ ops compiled on first use (DeepSpeed's CPU shared-memory communication op, the CPU decode kernel) go
# to one fixed folder inside the venv, built once by `make ops` rather than inside a timed test.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch-extensions
OPS    := $(TORCH_EXTENSIONS_DIR)/.built-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup ops demo test test-gpu gpu-suite gpu-wheels lint bench context-extension post-training rl expert-teacher fundamentals vlm diffusion video nerf sweep clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

$(OPS): $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
	$(BIN)/python -c "from workbench.nn.linear import skinny_linear_op, skinny_linear_error; skinny_linear_op() or print('CPU decode kernel not built:', skinny_linear_error())"
	touch $@

ops: $(OPS)

# The main job: the standard library's source -> tokenizer + shards (data/stdlib-4096), pretrain the ~2M
# Llama 3 on them with validation, sample from it, evaluate it on held-out text (perplexity, bits per byte,
# finishing held-out lines), and end by printing the path of the run's report.md.
# --resume: a second `make demo` continues (or, when finished, reuses) runs/llama3-demo instead of failing.
demo: setup
	$(BIN)/workbench data configs/llama3/demo.toml
	$(BIN)/workbench train configs/llama3/demo.toml --resume
	$(BIN)/workbench generate --ckpt runs/llama3-demo --prompt "def" --max-new-tokens 64 --temperature 0.8 --top-k 50 --seed 0
	$(BIN)/workbench eval --task perplexity,exact_match --ckpt runs/llama3-demo
	@echo "report: runs/llama3-demo/report.md"

# The whole suite (CPU). GPU tests skip themselves here, naming why.
test: setup ops
	$(BIN)/python -m pytest -q

# Single-GPU smoke tests, on a machine with CUDA torch already installed (no venv: it would pull CPU torch).
test-gpu:
	PYTHONPATH=$(CURDIR) python3 -m pytest -q -m gpu tests/gpu

# The GPU suite (docs/benchmarks.md, "GPU suite"): correctness on CUDA, then every headline speed against transformers,
# on a machine with CUDA torch (no venv, like test-gpu). The GPU machine lacks DeepSpeed and webdataset: `make
# gpu-wheels` here first, carry .whl there (launch/gpu_wheels.sh says how to install it).
gpu-suite:
	PYTHONPATH=$(CURDIR) python3 benchmarks/gpu_suite.py --out runs/gpu-suite

gpu-wheels: setup
	launch/gpu_wheels.sh

lint: setup
	$(BIN)/ruff check $(wildcard workbench evals data_pipelines tests benchmarks launch)

bench: setup
	$(BIN)/python benchmarks/llama_cpu.py

# Issue 7's context-extension experiment (docs/context-extension.md): passkeys at 256 tokens, YaRN to 4096.
context-extension: setup
	launch/context_extension.sh

# Issue 8's post-training stages (docs/post-training.md): SFT, DPO and distillation on the demo model, with evals.
post-training: setup
	launch/post_training.sh

# GRPO and PPO from the SFT model on verifiable reasoning, three seeds each, held-out evals (docs/rl.md).
rl: setup
	launch/rl.sh

# Issue 9's expert-teacher chatbot (docs/expert-teacher.md): a source tree (SOURCE=DIR; default the standard library)
# -> corpus, tokenizer, pretraining, SFT and teacher-DPO on data made from the tree, held-out evals, `workbench chat`.
expert-teacher: setup
	launch/expert_teacher.sh $(SOURCE)

# Issue 11's fundamentals (docs/fundamentals.md): every configs/fundamentals/*.toml (the autograd engine's MLP and
# CNN, the ResNet, the RNN and LSTM tasks, the VAE), each in runs/<its run.name>/ with report.md; --resume reuses
# finished runs. CIFAR=DIR points the ResNet at the CIFAR-10 python batches (otherwise it trains on shapes).
fundamentals: setup
	set -e; for c in configs/fundamentals/*.toml; do \
	  echo "== $$c"; \
	  $(BIN)/workbench fundamentals $$c --resume; \
	done
	$(if $(CIFAR),$(BIN)/workbench fundamentals configs/fundamentals/resnet.toml --task.data_dir $(CIFAR) --run.name resnet-cifar10 --resume)

# Issue 12's VLM recipe (docs/vlm-training.md): diagram documents, then per seed a blind baseline, the warm-up with the
# language model frozen and full fine-tuning of a small PaliGemma 2, the vqa evals and the measured part of the page.
vlm: setup
	launch/vlm.sh

# Issue 12's diffusion training (docs/diffusion-training.md): the caption-conditioned UNet on the digits and on the
# shapes (EMA, sample grids), each scored by FID, class accuracy and the CLIP-style score against real and noise.
diffusion: setup
	set -e; for c in digits shapes; do \
	  $(BIN)/workbench diffusion configs/diffusion/$$c.toml --resume; \
	  $(BIN)/workbench eval --task diffusion --ckpt runs/diffusion-$$c; \
	done

# Issue 13's video model (docs/video-training.md): moving shapes -> the causal video VAE -> a caption-conditioned
# AsymmDiT trained by rectified flow on its latents (EMA, sample strips and GIFs) -> eval --task video against real,
# broken-real and noise videos. About 45-50 min on 2 CPU cores; --resume reuses finished runs.
video: setup
	$(BIN)/workbench video configs/video/vae.toml --resume
	$(BIN)/workbench video configs/video/dit.toml --resume
	$(BIN)/workbench eval --task video --ckpt runs/video-dit

# Issue 14's sweep (docs/sweeps.md): 8 trials of the debug Llama 3 over learning rate and width with ASHA, each a
# run folder; then results.md, sweep.png, curves.png and best.toml. About a minute on 2 CPU cores.
sweep: setup
	$(BIN)/workbench data configs/llama3/debug.toml
	$(BIN)/workbench sweep configs/sweeps/llama3-lr.toml --resume
	@echo "results: runs/sweeps/llama3-lr/report.md"

# Issue 13's NeRF (docs/nerf.md): a scene the project ray-casts from known geometry, coarse + fine NeRF, held-out
# PSNR / SSIM beside the mean colour, a second render and noise, a novel-view GIF. About 10 min on one CPU thread.
nerf: setup
	$(BIN)/workbench nerf configs/nerf/scene.toml --resume
	$(BIN)/workbench eval --task nerf --ckpt runs/nerf-shapes

clean:
	rm -rf $(VENV) runs data .pytest_cache
