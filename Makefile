# Two commands do everything on a fresh machine:
#   make demo   - create the venv; start Tiled + Prefect + `xtec-flows serve` on 127.0.0.1, run a
#                 simulated bluesky temperature scan and watch its clustering result appear in Tiled;
#                 stop everything again
#   make test   - create the venv, run the test suite
# Also: make demo-engine (the engine alone on a synthetic zarr file: BIC sweep, modes d/s/peaks)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-engine test test-load bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/xtec-flows demo --workdir demo-output

demo-engine: $(STAMP)
	$(BIN)/xtec-flows synth demo-output/volume.zarr --shape 24,64,64,64 --seed 0 --overwrite
	$(BIN)/xtec-flows bic demo-output/volume.zarr --k 2..8 -o demo-output/bic --overwrite --quiet
	$(BIN)/xtec-flows cluster demo-output/volume.zarr -o demo-output/d --mode d -k 3 --seed 0 --overwrite
	$(BIN)/xtec-flows cluster demo-output/volume.zarr -o demo-output/s --mode s -k 3 --seed 0 --overwrite
	$(BIN)/xtec-flows cluster demo-output/volume.zarr -o demo-output/peaks --mode peaks -k 3 --seed 0 --overwrite
	@echo "demo results in demo-output/{d,s,peaks}: labels.zarr result.json qmap.png trajectories.png view.html; BIC sweep in demo-output/bic"

# Two phases: the suite on 2 pytest-xdist workers, then the 20-scan burst on the production stack
# (marker `load`) with the machine to itself, because it measures acquisition and processing
# under load and would otherwise compete with the embedded-stack tests for the 2 cores.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q --dist loadfile -m "not load"
	$(BIN)/python -m pytest -q -m load

# The burst alone (fails instead of skipping when PostgreSQL or redis-server is missing).
test-load: $(STAMP)
	XTEC_FLOWS_REQUIRE_SERVICES=1 $(BIN)/python -m pytest -q -m load

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py
	$(BIN)/python benchmarks/bench_flows.py
	$(BIN)/python benchmarks/bench_sizing.py
	$(BIN)/python benchmarks/bench_direct_reads.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_viewer.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_live.py --results benchmarks/RESULTS.md
	$(BIN)/python benchmarks/bench_worker_malloc.py
	$(BIN)/python benchmarks/bench_worker_tasks.py
	$(BIN)/python benchmarks/bench_unseen.py --results benchmarks/RESULTS.md

clean:
	rm -rf demo-output .pytest_cache
