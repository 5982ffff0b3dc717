-- API keys (issue 17), PostgreSQL dialect. The key itself is never stored: only its sha256,
-- compared in constant time. Every replica reads the same table.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,           -- key_<16 hex>, also in the key and in audit records
    name          TEXT NOT NULL,              -- who or what holds the key (free text)
    secret_sha256 TEXT NOT NULL,              -- hex sha256 of the whole key; never shown
    scopes        TEXT NOT NULL,              -- comma-separated: evaluate,gateway,audit:read,admin,metrics
    constitution  TEXT,                       -- default constitution of the key's requests
    constitutions TEXT,                       -- comma-separated allowed constitutions; NULL: any
    rate_rps      DOUBLE PRECISION,           -- requests per second (token bucket, per replica); NULL: no limit
    rate_tps      DOUBLE PRECISION,           -- texts per second (token bucket, per replica); NULL: no limit
    created_ms    BIGINT NOT NULL,
    revoked_ms    BIGINT                      -- set once by `charter keys revoke`; a revoked key never works again
);
