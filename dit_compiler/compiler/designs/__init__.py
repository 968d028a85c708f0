"""The block designs of `model.conditioning`, one module each, over the common part in `base`
(`dit_compiler.compiler.lower` picks the module of a spec's design)."""
