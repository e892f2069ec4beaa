"""Train a DeepSeek-V3-style MoE model: `python train.py --gin_file configs/tiny.gin --workdir DIR`.

The same as the installed `dsv3-train` command; the script lives in `dsv3_jax/train/main.py`.
"""

import sys

try:
    from dsv3_jax.train.main import main
except KeyboardInterrupt:  # Ctrl-C while the libraries are still importing: quiet, as main() is
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
