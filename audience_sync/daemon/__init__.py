"""The daemon behind `audience-sync run` (see `daemon.Daemon` for how its parts fit).

process       the process: signals, the start-up check, a graceful stop
daemon        Daemon: composes the parts; start, stop, reload
runtime       what the parts share
planner       what runs when, and the wake-up job
cadence       Engage's cadence per audience, run in groups (pure rules, tested directly)
flights       the group runs in flight
turns         one delivery chunk at a time across the daemon's runs
upkeep        the resync poll, history pruning and the reconcile
requirements  what the daemon needs before it starts
"""
