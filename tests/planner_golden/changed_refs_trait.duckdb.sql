CREATE TABLE audience_sync_planner.as_chg_revenue_7 AS SELECT DISTINCT coalesce(new_rows.planner_ref, old_rows.planner_ref) AS planner_ref 
FROM (SELECT audience_sync_planner.as_snap_revenue_7.planner_ref AS planner_ref, audience_sync_planner.as_snap_revenue_7.user_id AS user_id, audience_sync_planner.as_snap_revenue_7.value AS value 
FROM audience_sync_planner.as_snap_revenue_7) AS new_rows FULL OUTER JOIN (SELECT audience_sync_planner.as_snap_revenue_6.planner_ref AS planner_ref, audience_sync_planner.as_snap_revenue_6.user_id AS user_id, audience_sync_planner.as_snap_revenue_6.value AS value 
FROM audience_sync_planner.as_snap_revenue_6) AS old_rows ON new_rows.planner_ref = old_rows.planner_ref AND new_rows.user_id IS NOT DISTINCT FROM old_rows.user_id AND new_rows.value IS NOT DISTINCT FROM old_rows.value 
WHERE (new_rows.planner_ref IS NULL OR old_rows.planner_ref IS NULL) AND coalesce(new_rows.planner_ref, old_rows.planner_ref) IS NOT NULL
