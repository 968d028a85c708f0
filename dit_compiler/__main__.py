"""`python -m dit_compiler` is `ditc`."""
import sys

from dit_compiler.cli import main

sys.exit(main())
