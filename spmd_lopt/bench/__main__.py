"""``python -m spmd_lopt.bench``: see ``spmd_lopt.bench.cli``."""

from spmd_lopt.bench import cli

if __name__ == "__main__":
  cli.main()
