# Two commands for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On these machines a CPU wheel of torch 2.13.0 lies on disk; elsewhere pip picks a build.
TORCH ?= torch==2.13.0

.PHONY: demo test env clean

$(BIN)/gpt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/gpt

env: $(BIN)/gpt

# Prepare the bundled Shakespeare (characters), train the CPU config for a 2-minute budget
# (the same time on any host: the run picks its number of steps), print a sample.
demo: env
	$(BIN)/gpt prepare shakespeare_char --overwrite
	$(BIN)/gpt train configs/shakespeare_char.yaml --overwrite train.max_minutes=$(or $(MINUTES),2) train.eval_interval=200 train.eval_iters=50 train.ckpt_interval=200
	$(BIN)/gpt sample runs/shakespeare_char --prompt "ROMEO:" --max-new-tokens 300 --seed 1337

# The tests marked slow (training runs, multi-process runs, kill -9 loops, the benchmarks' smoke
# test: 125 tests, about 10 minutes on 2 cores) run only with SLOW=1, as in CI; the fast set
# took 39 s on an idle 2-core Xeon, 3 minutes on the same host shared (README, Set up).
# --durations lists the slowest: mark a test slow when it takes more than a few seconds.
test: env
	$(BIN)/ruff check gpt tests scripts
	$(BIN)/python -m pytest -q --durations=15 $(if $(SLOW),,-m "not slow")

clean:
	rm -rf $(VENV) runs data/shakespeare_char data/shakespeare_gpt2
