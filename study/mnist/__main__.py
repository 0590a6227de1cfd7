"""`python -m study.mnist`: the paper's command line (study.mnist.command); its exit status is main()'s."""

import sys

from study.mnist.command import main

if __name__ == "__main__":
    sys.exit(main())
