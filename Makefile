# Two commands are the contract (README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# The local CPU wheel; override for a CUDA build, e.g. `make test TORCH_SPEC='torch>=2.4'`.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
BIN := $(VENV)/bin
# c10d looks up a name for every Store address it connects to (a reverse DNS query that /etc/hosts
# does not answer). Where the resolver drops a query, glibc waits 5 s before it retries, and a
# launch or an engine starts 5 s late: for a local answer one second is plenty (docs/design.md).
export RES_OPTIONS ?= timeout:1 attempts:1
STAMP := $(VENV)/.codedgrad-installed
DEMO_DIR ?= outputs/demo
PAPER_DIR ?= outputs/paper

.PHONY: setup test lint demo paper stream stream-measure bench bench-engine soak clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The main job: the digits CNN on 4 EMULATED heterogeneous CPU ranks (hetero4 with rare stalls) with
# ddp, balanced and coded; a side-by-side table, $(DEMO_DIR)/demo.json, accuracy.png, TensorBoard logs (~2.5 min).
demo: $(STAMP)
	$(BIN)/python recipes/demo.py --out $(DEMO_DIR)

# The paper's setting planned, simulated and plotted, and the codes compared (seconds, no processes).
paper: $(STAMP)
	mkdir -p $(PAPER_DIR)
	$(BIN)/codedgrad plan --preset paper --redundancy 1.05
	$(BIN)/codedgrad simulate --preset paper --redundancy 1,1.05,1.1,1.2 --plot $(PAPER_DIR)/paper.png
	$(BIN)/codedgrad simulate --preset paper --redundancy 1.05,1.2,2 --code uncoded,repetition,frc,cyclic --jobs 300

# Coded least squares through the coded linear stream (1 master + 4 emulated workers), and the
# measured stream against the simulator (~15 min; docs/linear.md).
stream: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 5 recipes/stream.py

stream-measure: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 5 recipes/stream.py mode=measure

# The benchmark of the alternatives (docs/benchmarks.md): real models, EMULATED clusters in compute mode, one
# torchrun run, strategies interleaved; outputs/bench/<time>/. `make bench-engine`: the engine on sleeps.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 4 recipes/bench.py

bench-engine: $(STAMP)
	$(BIN)/python benchmarks/bench_planner.py
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 4 benchmarks/bench_engine.py

# The soak (docs/soak.md): $(RANKS) ranks (4) train under EMULATED stalls and drift with injected faults
# for $(DURATION) (3m; e.g. `make soak DURATION=30m`), checking outcomes, gradients, Store keys, RSS, threads.
soak: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(or $(RANKS),4) recipes/soak.py duration=$(or $(DURATION),3m)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
