"""safetrade: the safety-capability trade-off in fine-tuning aligned LLMs, in JAX/Flax."""

import os

# transformers is used for tokenizers and chat templates only; without torch it would print an advisory on
# import that every safetrade command would repeat.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
