"""`python -m dit_compiler.cli`: the `ditc` command."""
import sys

from dit_compiler.cli import main

sys.exit(main())
