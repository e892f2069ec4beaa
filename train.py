"""Train a DeepSeek-V3-style MoE model: `python train.py --gin_file configs/tiny.gin --workdir DIR`.

The same as the installed `dsv3-train` command; the script lives in `dsv3_jax/train/main.py`.
"""

import sys

from dsv3_jax.train.main import main

if __name__ == "__main__":
    sys.exit(main())
