"""Helpers both stages share: user errors and the command-line runner, atomic files, pid checks.

`common` imports neither `preprocess` nor `train`; both import it.
"""
