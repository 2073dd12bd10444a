CREATE TABLE audience_sync_planner.as_chg_revenue_7 AS SELECT changed.planner_ref 
FROM (SELECT added.planner_ref AS planner_ref 
FROM (SELECT trim(CAST(audience_sync_planner.as_snap_revenue_7.user_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_revenue_7.user_id AS user_id, audience_sync_planner.as_snap_revenue_7.value AS value 
FROM audience_sync_planner.as_snap_revenue_7 EXCEPT SELECT trim(CAST(audience_sync_planner.as_snap_revenue_6.user_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_revenue_6.user_id AS user_id, audience_sync_planner.as_snap_revenue_6.value AS value 
FROM audience_sync_planner.as_snap_revenue_6) AS added UNION SELECT removed.planner_ref AS planner_ref 
FROM (SELECT trim(CAST(audience_sync_planner.as_snap_revenue_6.user_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_revenue_6.user_id AS user_id, audience_sync_planner.as_snap_revenue_6.value AS value 
FROM audience_sync_planner.as_snap_revenue_6 EXCEPT SELECT trim(CAST(audience_sync_planner.as_snap_revenue_7.user_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_revenue_7.user_id AS user_id, audience_sync_planner.as_snap_revenue_7.value AS value 
FROM audience_sync_planner.as_snap_revenue_7) AS removed) AS changed
