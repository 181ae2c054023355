-- How many sagas have settled (left the stages of an order in flight) since the
-- database began, counted in the transaction that settles them: after a commit whose
-- answer was lost, the door's count of orders in flight is set right from it.
CREATE TABLE IF NOT EXISTS saga_totals (
    name     TEXT    PRIMARY KEY,
    settled  BIGINT  NOT NULL
);
