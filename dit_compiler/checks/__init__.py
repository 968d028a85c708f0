"""The diffusion checks of the compiler: verify (NNTile against torch against diffusers), the oracle, bench, sweep."""
