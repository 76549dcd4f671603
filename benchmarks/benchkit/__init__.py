"""Parts of benchmarks/throughput.py (run that script; these modules are its pieces)."""
