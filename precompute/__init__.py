"""GPU/CPU jobs that turn images (or features) into an INSIGHT atlas; one module per stage.

Run ``python -m precompute --help`` for the list of stages.
"""
