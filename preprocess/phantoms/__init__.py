"""Synthetic chest-CT phantoms in MosMedData's layout (`synth`) and their lesions (`lesions`): the demo's and
the tests' data, not patients."""
