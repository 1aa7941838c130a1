"""The tamper-evident audit log: one record per API request, hash-chained, written off the request path to
SQLite or PostgreSQL, spooled to a local file while the database is unreachable (see README "Audit log")."""
