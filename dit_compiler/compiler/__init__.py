"""The compiler: spec -> graph -> lowering -> targets (the NNTile model, the torch reference), and the build folder."""
