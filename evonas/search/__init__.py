"""The search: configuration, rejection stages, the worker's evaluation, the driver loop.

Flow: config.py (validated settings) -> driver.py (asks the controller of evolution.py
for candidates, runs the cheap checks, dispatches the rest through engine.py, tells the
results back, charges budget.py's ledger, saves the run folder, logs to tracking.py) ->
evaluate.py on the workers (rejection.py's stages, then proxy training per architecture).
"""
