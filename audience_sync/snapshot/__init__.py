"""Taking an audience's snapshot and diffing it, set-based, in the state database.

sources      one engine per source; the audience's query streamed in chunks
contract     which columns a query returns and how its rows become members
values       a computed trait's values, normalised to canonical JSON text
staging      the snapshot streamed into temporary tables of the state database
diff         an audience's entered and exited users, and its outbox rewritten
traits       the same for a computed trait's values
identities   a user known under new identifiers: resent, never told the opposite
field_types  the Planhat field type a key needs (`audience-sync fields`): declared or inferred
"""
