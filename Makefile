# Two commands do all set-up on a fresh machine:  make demo   |   make test
# TORCH_SPEC picks the torch build installed *before* anything else, so pip never swaps it for a
# multi-GB CUDA wheel. Default: the matching torch/torchvision pair that crfm-helm needs (CUDA builds
# that also run on the CPU). GPU users: e.g. make demo TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.flexgen-installed

.PHONY: install demo test test-slow bench report clean device-wheels

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q $(TORCH_SPEC)
	# pin whatever torch/torchvision are now installed, so crfm-helm's torchvision requirement cannot replace them
	$(BIN)/python -c "import importlib.metadata as m; print('\n'.join(f'{p}=={m.version(p).split(\"+\")[0]}' for p in ('torch', 'torchvision') if any(d.metadata['Name'] == p for d in m.distributions())))" > $(VENV)/constraints.txt
	$(BIN)/pip install --disable-pip-version-check -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flexgen-helm demo

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# what a CUDA machine with its own torch/transformers/accelerate lacks (the LP solver), as wheels for its
# Python (DEVICE_PY) in .whl/, to install there with --no-index (see the README's "CUDA acceptance")
DEVICE_PY ?= 3.12
device-wheels: $(STAMP)
	$(BIN)/pip download --disable-pip-version-check -q --no-deps --only-binary=:all: --python-version $(DEVICE_PY) \
		--implementation cp --platform manylinux2014_x86_64 -d .whl \
		"pulp==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("pulp"))')"

clean:
	rm -rf $(VENV) .cache demo_output benchmark_output prod_env
