-- API keys (issue 17), SQLite dialect. The key itself is never stored: only its sha256,
-- compared in constant time. Every replica reads the same table.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY NOT NULL,  -- key_<16 hex>, also in the key and in audit records
    name          TEXT NOT NULL,              -- who or what holds the key (free text)
    secret_sha256 TEXT NOT NULL,              -- hex sha256 of the whole key; never shown
    scopes        TEXT NOT NULL,              -- comma-separated: evaluate,gateway,audit:read,admin,metrics
    constitution  TEXT,                       -- default constitution of the key's requests
    constitutions TEXT,                       -- comma-separated allowed constitutions; NULL: any
    rate_rps      REAL,                       -- requests per second (token bucket, per replica); NULL: no limit
    rate_tps      REAL,                       -- texts per second (token bucket, per replica); NULL: no limit
    created_ms    INTEGER NOT NULL,
    revoked_ms    INTEGER                     -- set once by `charter keys revoke`; a revoked key never works again
);
