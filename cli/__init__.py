"""The `svdq-jax` command line (`cli.main.main`); `python -m cli` runs it too."""
