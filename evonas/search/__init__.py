"""The search: configuration, rejection stages, the worker's evaluation, the driver loop.

Flow: config.py (validated settings) -> driver.py (asks the controller of evolution.py
for candidates, runs the cheap checks, dispatches the rest through runtime/backends.py,
tells the results back, charges budget.py's ledger, records them in the run folder in
state.py's format, hands them to writer.py for MLflow, tracking.py) -> evaluate.py on the
workers (rejection.py's stages, then proxy training per architecture). results.py and
report.py read the run folder through state.py, never through the driver.
"""
