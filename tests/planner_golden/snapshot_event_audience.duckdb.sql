CREATE TABLE audience_sync_planner.as_snap_buyers_7 AS WITH events_1 AS 
(SELECT DISTINCT e.user_id AS user_id 
FROM prod.order_completed AS e 
WHERE e.user_id IS NOT NULL AND e.timestamp >= %(as_of_minus_30_days)s AND e.timestamp < %(as_of)s)
 SELECT coalesce(trim(CAST(user_id AS VARCHAR)), trim(CAST(email AS VARCHAR))) AS planner_ref, user_id, email 
FROM (SELECT u.id AS user_id, u.email AS email 
FROM prod.users AS u JOIN events_1 ON events_1.user_id = u.id) AS audience_rows
