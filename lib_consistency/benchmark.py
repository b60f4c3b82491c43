"""``python -m lib_consistency.benchmark``: the ConsiStory+ runner's first command, kept working.

The runner is ``lib_consistency.evaluate.consistory_plus`` (quality, beside the evaluation); speed is
``lib_consistency.bench``.
"""
import sys

from .evaluate.consistory_plus.cli import main

if __name__ == "__main__":
    sys.exit(main())
