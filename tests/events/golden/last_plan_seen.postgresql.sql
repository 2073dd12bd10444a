WITH last_1 AS
(SELECT r.user_id AS user_id, r.value AS value
FROM (SELECT e.user_id AS user_id, e.new_plan AS value, row_number() OVER (PARTITION BY e.user_id ORDER BY e.timestamp DESC NULLS LAST, e.received_at DESC NULLS LAST, e.id DESC NULLS LAST) AS event_rank
FROM prod.plan_changed AS e
WHERE e.user_id IS NOT NULL AND e.new_plan IS NOT NULL AND e.timestamp IS NOT NULL) AS r
WHERE r.event_rank = 1)
 SELECT u.id AS user_id, u.email AS email, last_1.value AS value
FROM prod.users AS u JOIN last_1 ON last_1.user_id = u.id
WHERE last_1.value IS NOT NULL
