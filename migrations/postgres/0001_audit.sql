-- Audit store, PostgreSQL dialect. Times are UTC milliseconds since the Unix epoch, so that
-- range filters and hour/day buckets are plain integer arithmetic in both dialects.

-- One row per evaluated text.
CREATE TABLE evaluations (
    id                   TEXT PRIMARY KEY,  -- eval_<uuid v7>[.<batch index>]
    time_ms              BIGINT NOT NULL,           -- when the evaluation was answered
    source               TEXT NOT NULL,              -- api | gateway
    client_key_id        TEXT,                       -- key_<12 hex of sha256(key)>, never the key
    constitution_id      TEXT NOT NULL,
    constitution_version TEXT NOT NULL,              -- -> constitution_versions
    model                TEXT NOT NULL,
    kind                 TEXT NOT NULL,              -- prompt | response
    verdict              TEXT NOT NULL,              -- pass | fail
    risk                 REAL NOT NULL,
    rules                TEXT NOT NULL,              -- JSON: [{id, score, threshold, violated, evidence?}]
    latency_ms           DOUBLE PRECISION NOT NULL,
    text                 TEXT,                       -- audit.text = full
    text_hash            TEXT,                       -- audit.text = hash: hex HMAC-SHA256
    context              TEXT,                       -- JSON object, when the request had one
    stored_ms            BIGINT NOT NULL            -- when this row was written (spool replay shows as a lag)
);
CREATE INDEX evaluations_time ON evaluations (time_ms, id);
CREATE INDEX evaluations_verdict_time ON evaluations (verdict, time_ms);
CREATE INDEX evaluations_constitution_time ON evaluations (constitution_id, time_ms);

-- One row per violated rule of an evaluation (rule filter and per-rule stats).
CREATE TABLE evaluation_violations (
    evaluation_id   TEXT NOT NULL,
    rule_id         TEXT NOT NULL,
    time_ms         BIGINT NOT NULL,
    PRIMARY KEY (evaluation_id, rule_id)
);
CREATE INDEX evaluation_violations_rule_time ON evaluation_violations (rule_id, time_ms);
CREATE INDEX evaluation_violations_time ON evaluation_violations (time_ms);

-- Each constitution version once: what decided the verdicts recorded under it.
CREATE TABLE constitution_versions (
    constitution_id TEXT NOT NULL,
    version         TEXT NOT NULL,                   -- sha256 of TOML, example files and calibration
    definition      TEXT NOT NULL,                   -- JSON: rules, principles, thresholds, exemplars
    calibration     TEXT,                            -- JSON: fitted thresholds (model, target, rules)
    first_seen_ms   BIGINT NOT NULL,
    PRIMARY KEY (constitution_id, version)
);
