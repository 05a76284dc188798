"""The training loop: Keras fit (loop), committing epochs (recorder), distribution, TensorBoard
events and PreciseBN."""
