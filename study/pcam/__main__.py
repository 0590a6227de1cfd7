"""`python -m study.pcam`: the paper's command line (study.pcam.command); its exit status is main()'s."""

import sys

from study.pcam.command import main

if __name__ == "__main__":
    sys.exit(main())
