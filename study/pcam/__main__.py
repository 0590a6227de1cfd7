"""`python -m study.pcam`: the PCam study's command line (study.pcam.command)."""

from study.pcam.command import main

if __name__ == "__main__":
    main()
