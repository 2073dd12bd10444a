CREATE TABLE audience_sync_planner.as_chg_big_accounts_7 AS SELECT changed.planner_ref 
FROM (SELECT added.planner_ref AS planner_ref 
FROM (SELECT trim(CAST(audience_sync_planner.as_snap_big_accounts_7.company_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_big_accounts_7.company_id AS company_id, audience_sync_planner.as_snap_big_accounts_7.name AS name 
FROM audience_sync_planner.as_snap_big_accounts_7 EXCEPT SELECT trim(CAST(audience_sync_planner.as_snap_big_accounts_6.company_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_big_accounts_6.company_id AS company_id, audience_sync_planner.as_snap_big_accounts_6.name AS name 
FROM audience_sync_planner.as_snap_big_accounts_6) AS added UNION SELECT removed.planner_ref AS planner_ref 
FROM (SELECT trim(CAST(audience_sync_planner.as_snap_big_accounts_6.company_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_big_accounts_6.company_id AS company_id, audience_sync_planner.as_snap_big_accounts_6.name AS name 
FROM audience_sync_planner.as_snap_big_accounts_6 EXCEPT SELECT trim(CAST(audience_sync_planner.as_snap_big_accounts_7.company_id AS VARCHAR)) AS planner_ref, audience_sync_planner.as_snap_big_accounts_7.company_id AS company_id, audience_sync_planner.as_snap_big_accounts_7.name AS name 
FROM audience_sync_planner.as_snap_big_accounts_7) AS removed) AS changed
