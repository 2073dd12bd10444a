"""A sync run, and the operations built on it.

run           sync(): lease, snapshot and diff each audience, deliver them together, record
queueing      per audience: stage, diff, guard, rewrite the outbox (one transaction)
planned       the same for a source with `planner_schema`: diffed in the warehouse, only the
              changes read out, and the crash-safe hand-off between the two databases
sending       deliver a run's outbox, by level (contacts, companies), into the reports
delivery      the delivery loop: pages in user order, in-flight traces, acknowledgements
guard         the mass-exit guard
dry_run       everything up to delivery, rolled back
reports       SyncOptions, RunReport, Progress
lease_keeper  renews a run's leases while it lives
reconcile     reading Planhat back, and repairing drift
retire        telling `false` to everyone for an audience gone from the config
"""
