WITH known_users AS
(SELECT DISTINCT i.user_id AS user_id
FROM rudder.identifies AS i
WHERE i.user_id IS NOT NULL),
events_1 AS
(SELECT DISTINCT e.user_id AS user_id
FROM rudder.order_completed AS e
WHERE e.user_id IS NOT NULL AND e.timestamp >= %(as_of_minus_30_days)s::TIMESTAMP WITH TIME ZONE AND e.timestamp < %(as_of)s::TIMESTAMP WITH TIME ZONE),
events_2 AS
(SELECT DISTINCT e.user_id AS user_id
FROM rudder.page_viewed AS e
WHERE e.user_id IS NOT NULL AND e.timestamp >= %(as_of_minus_14_days)s::TIMESTAMP WITH TIME ZONE AND e.timestamp < %(as_of_minus_36_hours)s::TIMESTAMP WITH TIME ZONE AND (substr(CAST(e.url AS VARCHAR), 1, length('/pricing')) = '/pricing' OR strpos(CAST(e.url AS VARCHAR), 'plans') > 0)),
trait_3 AS
(SELECT r.user_id AS user_id, r.email AS email
FROM (SELECT i.user_id AS user_id, i.email AS email, row_number() OVER (PARTITION BY i.user_id ORDER BY i.timestamp DESC NULLS LAST, i.received_at DESC NULLS LAST, i.id DESC NULLS LAST) AS event_rank
FROM rudder.identifies AS i
WHERE i.user_id IS NOT NULL AND i.email IS NOT NULL) AS r
WHERE r.event_rank = 1)
 SELECT u.user_id AS user_id, trait_3.email AS email
FROM known_users AS u JOIN events_1 ON events_1.user_id = u.user_id LEFT OUTER JOIN events_2 ON events_2.user_id = u.user_id LEFT OUTER JOIN trait_3 ON trait_3.user_id = u.user_id
WHERE events_2.user_id IS NULL
