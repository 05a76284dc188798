"""The training loop: Keras fit (loop), committing epochs (recorder), distribution, TensorBoard
events, PreciseBN, and a quiet TensorFlow import (native_logs)."""
