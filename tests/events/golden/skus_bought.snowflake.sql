WITH events_1 AS
(SELECT e.user_id AS user_id, CASE WHEN (count(e.sku) > 0) THEN ARRAY_AGG(DISTINCT CAST(e.sku AS VARCHAR)) END AS unique_1
FROM prod.order_completed AS e
WHERE e.user_id IS NOT NULL AND e.timestamp >= %(as_of_minus_365_days)s AND e.timestamp < %(as_of)s GROUP BY e.user_id)
 SELECT u.id AS user_id, u.email AS email, events_1.unique_1 AS value
FROM prod.users AS u JOIN events_1 ON events_1.user_id = u.id
WHERE events_1.unique_1 IS NOT NULL
