"""Demos of svdq-jax: `svdq-jax demo` runs `demo.layer_errors.main`; the embedded demo model (a
small FLUX.1-architecture pipeline trained here on OpenMoji emoji) is built by `demo.train`."""
