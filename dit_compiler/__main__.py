"""`python -m dit_compiler` is `ditc`, and `run` the `ditc` script's entry point: a Ctrl-C while ditc
starts (importing its modules, before `cli.main` handles signals) exits 130 without a traceback too."""
import sys


def run() -> int:
    try:
        from dit_compiler.cli import main
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
