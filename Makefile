# The two commands of the README: `make demo` (set up, fit the VAE on the embedded digits, evaluate,
# sample) and `make test` (set up, run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/pyro-lvm
DEMO := runs/demo-vae-digits

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	rm -rf $(DEMO)
	$(CLI) fit vae --data digits -p latent_dim=10 --epochs 100 --out $(DEMO) --quiet
	$(CLI) evaluate $(DEMO) --estimator elbo --samples 10
	$(CLI) evaluate $(DEMO) --estimator is --samples 1000
	$(CLI) sample $(DEMO) -n 64 --out $(DEMO)/samples.png

test: setup
	$(PY) -m pytest -q -n 2 --durations=15
