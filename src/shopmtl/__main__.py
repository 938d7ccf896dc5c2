"""``python -m shopmtl`` (and ``torchrun -m shopmtl``): the ``shopmtl`` command line."""

from shopmtl.cli import app

if __name__ == "__main__":
    app(prog_name="shopmtl")
