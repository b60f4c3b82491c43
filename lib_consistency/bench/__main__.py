"""``python -m lib_consistency.bench``."""
from .cli import main

main()
