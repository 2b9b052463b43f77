# dfqvit: `make demo` quantizes the bundled default model data-free; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases our build machines install from local files.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed data

# Fashion-MNIST from Debian's package where apt and root are available; otherwise point
# --data-dir / $$DFQVIT_FASHION_MNIST at the IDX files, or pass --download.
data:
	@if [ -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
		echo "warning: could not install dataset-fashion-mnist; tests needing it will be skipped"; \
	else echo "note: Fashion-MNIST not installed (needs root for apt-get install dataset-fashion-mnist)"; fi

demo: setup
	$(VENV)/bin/dfqvit quantize --model zoo:deit-fmnist --w-bits 4 --a-bits 8 --calib dfq \
		--data fashion-mnist --out runs/demo-deit-fmnist-w4a8 --force --results-file runs/demo-deit-fmnist-w4a8.json

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
