"""`python -m gpt ...` runs the CLI (and so does `torchrun ... -m gpt train ...`)."""

from gpt.cli import main

main()
