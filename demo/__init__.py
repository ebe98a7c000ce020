"""Demos of svdq-jax: `svdq-jax demo` runs `demo.layer_errors.main`."""
