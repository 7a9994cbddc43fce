"""``cvops bench ...``: the benchmarks. Each measures the product side by side with a baseline in
one process and reports ratios. No stage imports this package."""
