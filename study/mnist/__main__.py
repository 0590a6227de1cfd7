"""`python -m study.mnist`: the MNIST regression study's command line (study.mnist.command)."""

from study.mnist.command import main

if __name__ == "__main__":
    main()
