"""The torch reference target: every op kind's torch code (`ops`, `functions`) and the emitter that
walks the block-folded graph into `torch_reference.py` (`emitter`). Building never imports torch: the
emitter copies `functions.py`'s code by its source text."""
