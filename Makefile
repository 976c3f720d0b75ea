# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= reports/quick

.PHONY: demo test data bench clean docs-figures docs-figures-fmnist

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Real Fashion-MNIST from Debian, where apt is available and we are root (tests skip the data set otherwise); the
# same for Debian's chromium, which renders the report page in its browser test.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; fi
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium; the report's browser test will be skipped"; fi

# Exits 3 (so make fails) when a sanity check flags the results: `make demo DEMO_ARGS=--allow-flags` accepts them.
DEMO_ARGS ?=
demo: $(STAMP)
	$(VENV)/bin/robust-enc reproduce --preset quick --out $(OUT) $(DEMO_ARGS)

test: $(STAMP) data
	$(VENV)/bin/ruff check --no-cache robust_enc tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP) data
	$(PY) -m benchmarks.bench_gbr
	$(PY) -m benchmarks.bench_attacks
	$(PY) -m benchmarks.bench_autoattack
	$(PY) -m benchmarks.bench_enc_overhead

clean:
	rm -rf $(VENV) reports runs

# Refresh the README's figures from the last `make demo` (the report page's screenshot needs chromium).
docs-figures:
	cp $(OUT)/report/plots/adv_vs_eps_fgsm_linf.png $(OUT)/report/plots/gbr_epochs.png docs/img/
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
		--disable-component-update --disable-sync --user-data-dir=$$(mktemp -d) --hide-scrollbars \
		--window-size=1400,1000 --screenshot=$(CURDIR)/docs/img/report.png file://$(abspath $(OUT))/report/index.html

# Refresh the README's Fashion-MNIST figures from `robust-enc reproduce --preset fashion-mnist --out $(FMNIST)`.
FMNIST ?= reports/fashion-mnist
docs-figures-fmnist:
	cp $(FMNIST)/report/plots/gbr_weight_decay.png docs/img/gbr_weight_decay_fmnist.png
	cp $(FMNIST)/report/plots/gbr_vs_autoattack_linf_8-255.png docs/img/gbr_vs_autoattack_fmnist.png
