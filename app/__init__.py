"""The Gradio concept explorer (heatmaps, concept pages, family DAG, caption steering).

Not implemented yet: it arrives with the explorer-app issue and will read only an atlas built by
``precompute``. Until then ``app.py`` says so and ``make demo`` runs the pipeline that exists.
"""
