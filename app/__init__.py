"""The Gradio concept explorer: heatmaps, concept pages, family DAG, caption steering (docs/app.md).

It reads only an atlas (local folder or Hub repo id) and the backbone its manifest names.
``app.state`` loads everything once; ``app.explain``, ``app.concepts``, ``app.families`` and
``app.steer`` are pure functions (testable without Gradio); ``app.ui`` is the Gradio layer.
"""
