"""Entry point of the `ccoe` command."""
import sys
def main(argv=None) -> int:
    print("ccoe: placeholder", file=sys.stderr)
    return 0
