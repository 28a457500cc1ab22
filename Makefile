# The README's two commands. Both set up .venv first (idempotent; seconds when nothing changed).
.PHONY: run test setup bench-trl
run: setup
	.venv/bin/r1ray train configs/tiny.yaml run.output_dir=runs/tiny-$$(date +%Y%m%d-%H%M%S)
test: setup
	.venv/bin/python -m pytest
setup:
	@scripts/setup.sh
# Benchmark only: TRL (and its datasets/accelerate) installed within the project's pins, then r1ray vs TRL.
bench-trl: setup
	.venv/bin/pip install -q -c requirements/cpu.txt -r benchmarks/requirements-trl.txt
	.venv/bin/python benchmarks/trl_vs_r1ray.py
