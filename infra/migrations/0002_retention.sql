-- Retention: idempotency records are removed by kind (`http:` for clients' keys,
-- `cmd:` for the saga's commands) and age, finished sagas by stage and age.
CREATE INDEX IF NOT EXISTS idempotency_by_kind_and_age ON idempotency (substr(key, 1, 4), created_at);
CREATE INDEX IF NOT EXISTS sagas_by_stage_and_age ON sagas (stage, updated_at);
