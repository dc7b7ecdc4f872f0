"""`fedssl dashboard RUN_DIR`: a live web view of one run folder for the federation's coordinator.

Operations, not science: it only reads the files a run writes (`view.py` turns them into one JSON
document) and serves that document with a page that polls it (`app.py`). It never imports Flower
and never writes into the run folder, so it can follow a simulated run, a deployed ServerApp's
run folder or a finished run alike, on the coordinator's machine, offline (the chart library,
plotly.js, is served from the `plotly` Python package, not a CDN).
"""
