# Doctests are collected from the package and the docs; entry points and configs must not run.
collect_ignore = ["nnslim/__main__.py", "docs/conf.py", "docs/_build", "benchmarks"]
