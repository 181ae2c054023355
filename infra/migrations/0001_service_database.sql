-- The tables of a service database (and of the embedded log): the event store and
-- its outbox position, idempotency records, snapshots, consumer checkpoints and
-- Kafka offsets, dead letters, and the fulfilment saga. Read models are created by
-- their projections (they are rebuilt into shadow tables and swapped).

-- the event store
CREATE TABLE IF NOT EXISTS events (
    position        {serial},
    event_id        TEXT    NOT NULL UNIQUE,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    version         BIGINT NOT NULL,
    event_type      TEXT    NOT NULL,
    schema_version  BIGINT NOT NULL,
    occurred_at     TEXT    NOT NULL,
    correlation_id  TEXT    NOT NULL,
    causation_id    TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    UNIQUE (aggregate_type, aggregate_id, version)
);
CREATE INDEX IF NOT EXISTS events_by_type ON events (aggregate_type, position);
CREATE TABLE IF NOT EXISTS snapshots (
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    version         BIGINT NOT NULL,
    position        BIGINT NOT NULL,
    state           TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS relay_positions (
    name        TEXT    PRIMARY KEY,
    position    BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key           TEXT    PRIMARY KEY,
    request_hash  TEXT    NOT NULL,
    response      TEXT    NOT NULL,
    position      BIGINT NOT NULL,
    created_at    TEXT    NOT NULL
);

-- consumer checkpoints
CREATE TABLE IF NOT EXISTS checkpoints (
    name        TEXT    PRIMARY KEY,
    position    BIGINT NOT NULL,
    updated_at  TEXT    NOT NULL
);

-- dead letters
CREATE TABLE IF NOT EXISTS dead_letters (
    id          {serial},
    consumer    TEXT    NOT NULL,
    position    BIGINT NOT NULL,
    event       TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    failed_at   TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_consumer ON dead_letters (consumer, id);

-- Kafka offsets
CREATE TABLE IF NOT EXISTS kafka_offsets (
    consumer    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   BIGINT  NOT NULL,
    next_offset BIGINT  NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);

-- the fulfilment saga
CREATE TABLE IF NOT EXISTS sagas (
    order_id        TEXT PRIMARY KEY,
    state           TEXT NOT NULL,
    stage           TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS saga_outbox (
    id              {serial},
    command_id      TEXT NOT NULL UNIQUE,
    order_id        TEXT NOT NULL,
    command         TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    causation_id    TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS saga_applied (
    aggregate_type  TEXT NOT NULL,
    aggregate_id    TEXT NOT NULL,
    version         BIGINT NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS saga_deadlines (
    order_id        TEXT PRIMARY KEY,
    due_at          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS saga_deadlines_by_due ON saga_deadlines (due_at);
