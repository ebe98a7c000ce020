"""The embedded demo model: a small FLUX.1-architecture pipeline trained here on OpenMoji emoji."""
