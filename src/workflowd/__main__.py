"""``python -m workflowd``."""

from workflowd.cli import main

main()
