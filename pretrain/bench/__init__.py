"""setdiff-bench: benchmarks that print numbers (cli.py, one module per subcommand)."""
