"""``python -m gessl_ext.train [flags]`` = ``gessl-train``; ``python -m gessl_ext.train compare [flags]`` = ``gessl-compare``."""
import sys

from .cli import compare_main, train_main

if len(sys.argv) > 1 and sys.argv[1] == "compare":
    sys.exit(compare_main(sys.argv[2:]))
sys.exit(train_main(sys.argv[1:]))
