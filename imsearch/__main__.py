"""`python -m imsearch`: the same as the `imsearch` command."""

from .cli import main

main()
