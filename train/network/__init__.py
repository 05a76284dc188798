"""The network: its shape arithmetic (architecture), the Keras model (model), what it learns
(tasks), and how it is scored (scores, keras_metrics, precision)."""
