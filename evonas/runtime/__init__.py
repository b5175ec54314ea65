"""Where work runs and is recorded, shared by search and full training alike.

    cluster.py   connecting to Ray: an embedded loopback-only Ray with tokens, or a cluster
    backends.py  running tasks on Ray or inline and collecting their outcomes
    limits.py    a worker's threads, GPU memory cap and device (a GPU share needs CUDA)
    checks.py    argument checks: whole numbers, GPU shares, CPUs, time limits, names
    reasons.py   one line for a failure
    tracking.py  the MLflow Tracker
"""
