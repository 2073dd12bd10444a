WITH known_users AS
(SELECT DISTINCT i.user_id AS user_id
FROM rudder.identifies AS i
WHERE i.user_id IS NOT NULL),
mode_1 AS
(SELECT r.user_id AS user_id, r.value AS value
FROM (SELECT c.user_id AS user_id, c.value AS value, row_number() OVER (PARTITION BY c.user_id ORDER BY c.frequency DESC, c.value ASC) AS event_rank
FROM (SELECT e.user_id AS user_id, CAST(e.sku AS VARCHAR) AS value, count(DISTINCT e.id) AS frequency
FROM rudder.order_completed AS e
WHERE e.user_id IS NOT NULL AND e.sku IS NOT NULL GROUP BY e.user_id, CAST(e.sku AS VARCHAR)
HAVING count(DISTINCT e.id) >= 2) AS c) AS r
WHERE r.event_rank = 1),
trait_2 AS
(SELECT r.user_id AS user_id, r.email AS email
FROM (SELECT i.user_id AS user_id, i.email AS email, row_number() OVER (PARTITION BY i.user_id ORDER BY i.timestamp DESC NULLS LAST, i.received_at DESC NULLS LAST, i.id DESC NULLS LAST) AS event_rank
FROM rudder.identifies AS i
WHERE i.user_id IS NOT NULL AND i.email IS NOT NULL) AS r
WHERE r.event_rank = 1)
 SELECT u.user_id AS user_id, trait_2.email AS email, mode_1.value AS value
FROM known_users AS u JOIN mode_1 ON mode_1.user_id = u.user_id LEFT OUTER JOIN trait_2 ON trait_2.user_id = u.user_id
WHERE mode_1.value IS NOT NULL
