"""One module per tab of the explorer; each ``build(...)`` lays its tab out inside the open
``gr.Tabs``, wires its own events and returns the components the other tabs link to.

``explain`` (image -> heatmaps, hierarchy, export), ``concepts`` (search, browse, concept page),
``families`` (DAG of a concept, overview charts), ``steer`` (caption steering sliders).
``app.ui.build_ui`` assembles them and wires the cross-tab links.
"""
