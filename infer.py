"""Generate text with a DeepSeek-V3 model: `python infer.py --hf_checkpoint DIR --prompt "Hello"`.

The same as the installed `dsv3-infer` command; the script lives in `dsv3_jax/infer/main.py`.
"""

import sys

try:
    from dsv3_jax.infer.main import main
except KeyboardInterrupt:  # Ctrl-C while the libraries are still importing: quiet
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
