"""The embedded demo: a small FLUX.1-architecture pipeline trained here on OpenMoji emoji
(`demo.train`), its classifier (`demo.classifier`) and `svdq-jax demo`'s measurement of every
quantization preset on it (`demo.quality`)."""
