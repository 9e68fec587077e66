-- An order, and its receipt once the worker has sent it.
CREATE TABLE shop_order (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    items jsonb NOT NULL,
    total_cents bigint NOT NULL CHECK (total_cents >= 0),
    receipt_job bigint,
    receipt_number text,
    receipt_sent_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
