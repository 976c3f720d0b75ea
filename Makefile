# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= reports/quick

.PHONY: demo test data bench clean docs-figures

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Real Fashion-MNIST from Debian, where apt is available and we are root (tests skip the data set otherwise).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; fi

demo: $(STAMP)
	$(VENV)/bin/robust-enc reproduce --preset quick --out $(OUT)

test: $(STAMP) data
	$(VENV)/bin/ruff check --no-cache robust_enc tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP) data
	$(PY) -m benchmarks.bench_gbr
	$(PY) -m benchmarks.bench_attacks
	$(PY) -m benchmarks.bench_enc_overhead

clean:
	rm -rf $(VENV) reports runs

# Refresh the README's figures from the last `make demo`.
docs-figures:
	cp $(OUT)/report/plots/adv_vs_eps_fgsm_linf.png $(OUT)/report/plots/gbr_epochs.png docs/img/
