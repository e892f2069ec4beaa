"""Serve a DeepSeek-V3 model over an OpenAI-compatible API: `python serve.py --hf_checkpoint DIR --port 8000`.

The same as the installed `dsv3-serve` command; the script lives in `dsv3_jax/serve/main.py`.
"""

import sys

from dsv3_jax.serve.main import main

if __name__ == "__main__":
    sys.exit(main())
