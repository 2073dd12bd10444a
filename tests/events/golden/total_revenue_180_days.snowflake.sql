WITH events_1 AS
(SELECT d.user_id AS user_id, sum(d.revenue) AS sum_1
FROM (SELECT DISTINCT e.user_id AS user_id, e.id AS id, e.revenue AS revenue
FROM prod.order_completed AS e
WHERE e.user_id IS NOT NULL AND e.timestamp >= %(as_of_minus_180_days)s AND e.timestamp < %(as_of)s) AS d GROUP BY d.user_id)
 SELECT u.id AS user_id, u.email AS email, events_1.sum_1 AS value
FROM prod.users AS u JOIN events_1 ON events_1.user_id = u.id
WHERE events_1.sum_1 IS NOT NULL
