"""The Gradio concept explorer: heatmaps, concept pages, family DAG, caption steering (docs/app.md).

It reads only an atlas (local folder or Hub repo id) and the backbone its manifest names.
``app.state`` loads everything once; ``app.explain``, ``app.concepts``, ``app.families`` and
``app.steer`` are pure functions (testable without Gradio). The Gradio layer: ``app.views``
(handlers bound to the state, the JSON API), ``app.components`` (shared widgets and error
handling), ``app.tabs`` (one module per tab) and ``app.ui`` (assembles them). ``app.server``
creates and launches it. The app never imports ``precompute`` (it runs its CLI when it must).
"""
