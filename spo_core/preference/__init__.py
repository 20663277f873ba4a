"""The step-aware preference model (SPM): time-conditioned CLIP, noisy-pair data, training.

Import from the submodules (``time_clip``, ``noisy_pairs``, ``train``, ``config``); this package
does not import them eagerly so that ``import spo_core.preference.config`` stays light.
"""
