-- The demo table of the web tier: 10,000 rows of (id, randomnumber), as in
-- the TechEmpower "single query" benchmark that /row/ serves.
CREATE TABLE IF NOT EXISTS world (
    id           integer PRIMARY KEY,
    randomnumber integer NOT NULL
);

INSERT INTO world (id, randomnumber)
SELECT id, 1 + floor(random() * 10000)::integer
FROM generate_series(1, 10000) AS id
ON CONFLICT (id) DO NOTHING;
