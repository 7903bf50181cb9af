# Two commands do all the set-up on a fresh machine with Python >= 3.10 and pip:
#   make demo   -> create/reuse .venv, install acmix, run the main job
#   make test   -> create/reuse .venv, install acmix[dev], run lint + format + types + tests
# and
#   make docs   -> the documentation site (mkdocs.yml, docs/) built strictly and offline into site/; also part of
#                  `make test`, so a broken page, link or API reference fails CI
#   make bench  -> the op benchmark of docs/benchmarks.md (`acmix bench op`) at two ResNet stages, a few minutes on 2 cores;
#                  rows, ratios and a plot in $(BENCH_OUT); BENCH_ARGS="..." for other settings
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.acmix-installed
BENCH_OUT ?= bench-results
BENCH_ARGS ?= --shapes 64x56,256x14 --strides 1 --threads 2 --repeats 3 --warmup 1

.PHONY: demo test test-slow lint docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/acmix train

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy src

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/acmix bench op $(BENCH_ARGS) --csv $(BENCH_OUT)/op.csv --json $(BENCH_OUT)/op.json --plot $(BENCH_OUT)/op.png

test-slow: $(STAMP)
	ACMIX_RUN_SLOW=1 $(BIN)/python -m pytest -q -m slow -p no:cacheprovider

clean:
	rm -rf $(VENV) site build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
