CREATE TABLE audience_sync_planner.as_chg_revenue_7 AS WITH unmatched AS 
(SELECT coalesce(new_rows.planner_ref, old_rows.planner_ref) AS planner_ref, new_rows.planner_ref IS NOT NULL AS planner_new, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.user_id ELSE old_rows.user_id END AS user_id, CASE WHEN (new_rows.planner_ref IS NOT NULL) THEN new_rows.value ELSE old_rows.value END AS value 
FROM (SELECT trim(CAST(user_id AS VARCHAR)) AS planner_ref, user_id, value 
FROM (SELECT * 
FROM (SELECT user_id, value FROM prod.revenue) AS audience_sync_query) AS audience_rows) AS new_rows FULL OUTER JOIN (SELECT audience_sync_planner.as_snap_revenue_6.planner_ref AS planner_ref, audience_sync_planner.as_snap_revenue_6.user_id AS user_id, audience_sync_planner.as_snap_revenue_6.value AS value 
FROM audience_sync_planner.as_snap_revenue_6) AS old_rows ON new_rows.planner_ref = old_rows.planner_ref AND new_rows.user_id IS NOT DISTINCT FROM old_rows.user_id AND new_rows.value IS NOT DISTINCT FROM old_rows.value 
WHERE (new_rows.planner_ref IS NULL OR old_rows.planner_ref IS NULL) AND coalesce(new_rows.planner_ref, old_rows.planner_ref) IS NOT NULL), 
was AS 
(SELECT audience_sync_planner.as_snap_revenue_6.planner_ref AS planner_ref, audience_sync_planner.as_snap_revenue_6.user_id AS user_id, audience_sync_planner.as_snap_revenue_6.value AS value 
FROM audience_sync_planner.as_snap_revenue_6 
WHERE audience_sync_planner.as_snap_revenue_6.planner_ref IN (SELECT unmatched.planner_ref 
FROM unmatched))
 SELECT false AS planner_new, was.planner_ref, was.user_id, was.value 
FROM was UNION ALL SELECT true AS planner_new, unmatched.planner_ref, unmatched.user_id, unmatched.value 
FROM unmatched 
WHERE unmatched.planner_new UNION ALL SELECT true AS planner_new, was.planner_ref, was.user_id, was.value 
FROM was 
WHERE NOT (EXISTS (SELECT * 
FROM unmatched AS gone 
WHERE NOT gone.planner_new AND gone.planner_ref = was.planner_ref AND gone.user_id IS NOT DISTINCT FROM was.user_id AND gone.value IS NOT DISTINCT FROM was.value))
