.PHONY: install demo test bench
install:
	bash scripts/install.sh
demo: install
	.venv/bin/python examples/trl_demo.py
test: install
	bash scripts/test.sh
bench: install
	.venv/bin/python benchmarks/run_all.py --quick
