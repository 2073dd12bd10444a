SELECT audience_sync_planner.as_snap_pro_plan_7.user_id, audience_sync_planner.as_snap_pro_plan_7.email, audience_sync_planner.as_snap_pro_plan_7.name, audience_sync_planner.as_snap_pro_plan_7.title, audience_sync_planner.as_snap_pro_plan_7.company_id 
FROM audience_sync_planner.as_snap_pro_plan_7 
WHERE coalesce(trim(CAST(audience_sync_planner.as_snap_pro_plan_7.user_id AS VARCHAR)), trim(CAST(audience_sync_planner.as_snap_pro_plan_7.email AS VARCHAR))) IN (SELECT audience_sync_planner.as_chg_pro_plan_7.planner_ref 
FROM audience_sync_planner.as_chg_pro_plan_7)
