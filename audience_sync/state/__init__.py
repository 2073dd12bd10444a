"""The state database: what audience-sync knows, in SQL (SQLite by default, PostgreSQL in
production), with the schema managed by Alembic.

    models      the tables (SQLAlchemy Core), and the schema revision this version needs
    database    opening it: the engine, SQLite's tuning, the schema check, one-line errors
    migrations  the schema's revisions and `db upgrade`

One module per table family writes that table's SQL, and no other module does (a test holds
it): `audiences`, `baseline`, `outbox` (pending and in_flight), `runs`, `changes`, `leases`,
`resyncs`, `pauses`, `run_requests`. `history` reads across them for `status` and the status
page, `explain` for a user's story.
"""
